"""``generate`` with mtkit's per-sentence length limit, for a model exported by ``mtkit export
huggingface``.

The export copies this file as ``custom_generate/generate.py``; transformers runs it in place of
``model.generate`` when the model is loaded with ``trust_remote_code=True``. mtkit's parity check
imports it. It imports only torch and transformers: it runs without mtkit.

mtkit ends an output at ``floor(max_len_a * source_length + max_len_b)`` tokens (the source
counted with its EOS and language token, at most what the decoder's positions hold), where it
forces EOS with EOS's own log-probability. ``generate`` alone has one ``max_length`` for every
sentence and, with ``forced_eos_token_id``, scores the forced EOS 0. Here every sentence gets its
own limit, read from the generation config's ``max_len_a`` and ``max_len_b``.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList


class SourceLengthLimit(LogitsProcessor):
    """Only EOS, with its own score, in a row that has generated its sentence's limit.

    limits: ``(B,)`` output tokens per sentence (EOS not counted); a batch of ``B * k`` rows
    (beam search) holds each sentence's ``k`` rows together. start: decoder tokens before the
    first generated one (the decoder start token).
    """

    def __init__(self, limits: torch.Tensor, eos_token_id: int, start: int = 1):
        self.limits, self.eos_token_id, self.start = limits, eos_token_id, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.start
        limits = self.limits.to(scores.device).repeat_interleave(scores.shape[0] // self.limits.shape[0])
        at_limit = limits <= generated
        if not bool(at_limit.any()):
            return scores
        only_eos = torch.full_like(scores, float("-inf"))
        only_eos[:, self.eos_token_id] = scores[:, self.eos_token_id]
        return cast(torch.FloatTensor, torch.where(at_limit[:, None], only_eos, scores))


def source_limits(source_lengths: torch.Tensor, max_len_a: float, max_len_b: int, max_positions: int,
                  min_new_tokens: int = 0) -> torch.Tensor:
    """``(B,)`` output tokens per sentence for sources of ``source_lengths`` tokens (EOS
    included): mtkit's ``floor(a * length + b)``, at least ``min_new_tokens``, at most the
    decoder positions after its start token."""
    limits = torch.floor(max_len_a * source_lengths.double() + max_len_b).long()
    return limits.clamp(min=min_new_tokens).clamp(max=max_positions - 1).clamp(min=0)


def generate(*args: Any, model: Any, **kwargs: Any) -> Any:
    """``model.generate(...)`` with each sentence's length limit (see the module docstring);
    transformers passes ``model`` by keyword. Without ``max_len_a``/``max_len_b`` in the
    generation config, or with ``max_new_tokens`` or ``max_length`` given here, it is plain
    ``generate``."""
    config = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    a, b = getattr(config, "max_len_a", None), getattr(config, "max_len_b", None)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if a is None or b is None or input_ids is None or {"max_new_tokens", "max_length"} & kwargs.keys():
        return GenerationMixin.generate(model, *args, generation_config=config, **kwargs)
    mask = kwargs.get("attention_mask")
    lengths = mask.sum(dim=1) if mask is not None else (input_ids != config.pad_token_id).sum(dim=1)
    limits = source_limits(lengths, a, b, model.config.max_position_embeddings, config.min_new_tokens or 0)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(SourceLengthLimit(limits, eos))
    # One step more than the longest output and its EOS: ``forced_eos_token_id`` (which generate
    # takes from the model's own generation config where this one unsets it) forces EOS at the
    # last step with a score of 0, and every sentence has ended before that step.
    config.max_new_tokens = int(limits.max()) + 2
    config.max_length = None
    return GenerationMixin.generate(model, *args, generation_config=config, logits_processor=processors, **kwargs)

