"""Small random models and source batches for the search tests of both architectures."""

from __future__ import annotations

import torch
from torch import nn

from mtkit.vocab import EOS_ID, PAD_ID

SOURCES = [[5, 9, 12, 7], [8, 4], [20, 21, 22, 23, 24, 25], [6]]
"""Source rows of different lengths (ids without EOS)."""


def favour_eos(model: nn.Module, vocab: int, eos_bias: float) -> nn.Module:
    """Give ``model`` a sharper output layer that favours EOS a little, so that hypotheses end at
    different lengths instead of all running to the maximum; returns it in eval mode."""
    model.output_proj = nn.Linear(model.cfg.d_model, vocab, bias=True)
    with torch.no_grad():
        model.output_proj.weight.mul_(4.0)
        model.output_proj.bias.zero_()
        model.output_proj.bias[EOS_ID] = eos_bias
    return model.eval()


def make_src(rows: list[list[int]]) -> torch.Tensor:
    """Rows of ids, each followed by EOS, right-padded."""
    width = max(len(r) for r in rows) + 1
    src = torch.full((len(rows), width), PAD_ID)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.tensor(r)
        src[i, len(r)] = EOS_ID
    return src
