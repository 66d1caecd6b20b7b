"""The model architectures a config may name (``model.arch``) and the one factory that builds
them, so that training, checkpoints and translation never choose a class themselves.

Both architectures share the interface training and search use: ``cfg``, ``features(src,
tgt_in)``, ``output_proj``, ``encode(src)`` returning a state with ``select``,
``repeat``, ``reorder_self`` and ``nbytes``, ``decode_step(tokens, state)`` and ``positions_left(src)``.
"""

from __future__ import annotations

from typing import TypeAlias

from mtkit.config import ModelConfig
from mtkit.decoder_only import DecoderOnly, DecoderOnlyState
from mtkit.model import DecoderState, Transformer

Model: TypeAlias = Transformer | DecoderOnly
State: TypeAlias = DecoderState | DecoderOnlyState

ARCHITECTURES: dict[str, type[Transformer] | type[DecoderOnly]] = {
    "encoder_decoder": Transformer,
    "decoder_only": DecoderOnly,
}


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Model:
    """A freshly initialised model of ``cfg.arch`` (see ``Transformer`` for the arguments)."""
    return ARCHITECTURES[cfg.arch](cfg, src_vocab_size, tgt_vocab_size, joint_vocab)
