"""The model families a config may name (``model.arch``), the one factory that builds them, and
the interface the rest of mtkit drives them through, so that training, checkpoints, search,
translation and export never choose a class or ask which one they hold.

A family is one file: ``layers`` holds the shared building blocks; ``encoder_decoder`` and
``decoder_only`` build on them. A new family adds its file and one entry to ``ARCHITECTURES``
(and ``Model``), and implements ``TranslationModel``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, TypeAlias

from torch import Tensor, nn

from mtkit.config import ModelConfig
from mtkit.models.decoder_only import DecoderOnly, DecoderOnlyState
from mtkit.models.encoder_decoder import DecoderState, Transformer


class DecodingState(Protocol):
    """What incremental decoding carries between steps for a batch of rows (``encode`` makes it,
    ``decode_step`` extends it)."""

    length: int
    """Target positions decoded so far."""

    def select(self, rows: Tensor) -> DecodingState:
        """Keep (and reorder or repeat) batch rows."""

    def repeat(self, beams: int) -> DecodingState:
        """Each row as ``beams`` rows (beam search)."""

    def reorder_self(self, rows: Tensor) -> None:
        """Reorder the cache among the beams of each sentence."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""


class TranslationModel(Protocol):
    """What training, search, translation and export ask of a model family.

    Shapes: B batch, S source length, T target length, D d_model, V vocabulary.
    """

    cfg: ModelConfig
    output_proj: nn.Linear
    has_encoder: ClassVar[bool]
    """Whether the source runs through an encoder of its own (an encoder-decoder; CTranslate2's
    Translator and Marian) or is the prompt of one stack (CTranslate2's Generator)."""

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Output ``(B, T, D)`` at the target positions, before ``output_proj`` (training)."""

    def encode(self, src: Tensor) -> DecodingState:
        """Read source ids ``(B, S)`` (EOS included, right-padded) once; the state to decode from."""

    def decode_step(self, tokens: Tensor, state: Any) -> Tensor:
        """Feed ``(B, t)`` new target tokens; logits ``(B, V)`` of the last. ``state``: what this
        model's ``encode`` returned (each family takes its own)."""

    def max_source_length(self) -> int:
        """Source subwords (without EOS) the model accepts; longer lines are truncated to it."""

    def positions_left(self, src: Tensor) -> Tensor:
        """``(B,)`` positions left for each row's target (its BOS included)."""


Model: TypeAlias = Transformer | DecoderOnly
State: TypeAlias = DecoderState | DecoderOnlyState

ARCHITECTURES: dict[str, type[Model]] = {
    "encoder_decoder": Transformer,
    "decoder_only": DecoderOnly,
}


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Model:
    """A freshly initialised model of ``cfg.arch`` (see ``Transformer`` for the arguments)."""
    return ARCHITECTURES[cfg.arch](cfg, src_vocab_size, tgt_vocab_size, joint_vocab)
