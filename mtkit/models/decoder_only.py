"""The decoder-only Transformer: one stack of self-attention blocks over source and target.

Shapes: B batch, S source length, T target length, L = S + T, D d_model, H heads, V vocabulary.

A pair is one sequence ``source EOS BOS target``: the source ids and their EOS (as the
encoder-decoder's source), then the target as the encoder-decoder's decoder reads it (BOS
first). BOS is the separator: no vocabulary id is added, and the model predicts the first
target token at the BOS, the next at that token, ..., EOS at the last. Source rows are
right-padded as in ``mtkit.batching``, so the padded source block is followed directly by the
target block: padding sits between them, and every padding key is masked out, so a pair never
sees its padding and no pair sees another (one pair a row, no packing).

Attention (``allowed``): a target position sees every source position and the target up to
itself; a source position sees the source before it (``source_attention: causal``, a plain
language model) or all of it (``bidirectional``, a prefix LM). Positions: the source counts
from 0; the target (from its BOS) continues after the source's real length or restarts at 0
(``target_positions``), the same in a batch as alone.

Blocks are the encoder's layers (``mtkit.models.layers.Block``: the same attention,
feed-forward and residual wiring, pre- or post-norm, the same dropouts and names), so a block maps one-to-one onto a
CTranslate2 decoder layer without cross-attention. ``forward``/``features`` are for
training (the target positions only); ``encode`` runs the source once per sentence into a
key/value cache, and ``decode_step`` extends it one token at a time, the interface
``mtkit.search`` drives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mtkit.config import ModelConfig
from mtkit.models.layers import (
    Block,
    PositionInfo,
    Positions,
    RelativeBias,
    Rotary,
    dropout,
    embedding_norm,
    final_norm,
    init_parameters,
    make_embeddings,
    output_projection,
    output_scale,
)
from mtkit.vocab import PAD_ID


@dataclass
class DecoderOnlyState:
    """What incremental decoding carries between steps, for a batch of B rows.

    source_mask: ``(B, 1, 1, S)``, True at the real source tokens (padding False).
    source_len: ``(B,)`` real source tokens (EOS included), where continuing positions start.
    kv: per block, ``[k, v]`` of the source and the target so far ``(B, H, S + t, D/H)``.
    length: target positions decoded so far.
    first: with ``model.separator: none``, each row's last prompt token, fed in place of the BOS.
    """

    source_mask: Tensor
    source_len: Tensor
    kv: list[list[Tensor]]
    length: int = 0
    first: Tensor | None = None

    def select(self, rows: Tensor) -> DecoderOnlyState:
        """Keep (and reorder or repeat) batch rows, e.g. beams that survived a search step."""
        return DecoderOnlyState(
            source_mask=self.source_mask.index_select(0, rows),
            source_len=self.source_len.index_select(0, rows),
            kv=[[t.index_select(0, rows) for t in kv] for kv in self.kv],
            length=self.length,
            first=None if self.first is None else self.first.index_select(0, rows),
        )

    def repeat(self, beams: int) -> DecoderOnlyState:
        """Each row as ``beams`` rows (beam search)."""
        return self.select(torch.arange(self.source_len.shape[0], device=self.source_len.device)
                           .repeat_interleave(beams))

    def reorder_self(self, rows: Tensor) -> None:
        """Reorder the key/value cache among the beams of each sentence (beams of one sentence
        share their source, so its mask and length stay)."""
        self.kv = [[t.index_select(0, rows) for t in kv] for kv in self.kv]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for kv in self.kv for t in kv)


class DecoderOnly(nn.Module):
    """Decoder-only Transformer. Build with ``DecoderOnly(cfg, src_vocab, tgt_vocab)``."""

    has_encoder: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True):
        """``joint_vocab``: both sides use one SentencePiece model, so one embedding may serve
        both; with two vocabularies the source and target parts are embedded by two tables."""
        super().__init__()
        self.cfg = cfg
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.dropout = cfg.dropout
        self.bidirectional = cfg.source_attention == "bidirectional"
        self.restart = not cfg.target_follows_source
        self.prompt = cfg.separator == "none"
        self.src_embed, self.tgt_embed = make_embeddings(cfg, src_vocab_size, tgt_vocab_size, joint_vocab)
        self.positions = Positions(cfg)
        self.embedding_norm = embedding_norm(cfg)
        # Positions inside attention: rotary angles, or a relative bias that looks both ways
        # where the source does (a prefix LM).
        self.rotary = Rotary(cfg) if cfg.positions == "rope" else None
        self.relative = RelativeBias(cfg, bidirectional=self.bidirectional) if cfg.positions == "relative" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = final_norm(cfg)
        self.output_proj = output_projection(cfg, tgt_vocab_size)
        self.output_scale = output_scale(cfg)
        self.reset_parameters()
        if cfg.tie_output:
            self.output_proj.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        init_parameters(self, [self.src_embed, self.tgt_embed], self.cfg.d_model)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ training

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` for source ids ``(B, S)`` and target input ids ``(B, T)``."""
        return self.output_proj(self.features(src, tgt_in))

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Output ``(B, T, D)`` at the target positions, before the output projection."""
        return self.sequence_features(src, tgt_in)[:, src.shape[1] :]

    def sequence_features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Output ``(B, S + T, D)`` at every position of ``source target`` (the source part
        is what a language-model loss on the source reads)."""
        if self.prompt:
            src, first = self._split_prompt(src)
            tgt_in = torch.cat([first[:, None], tgt_in[:, 1:]], dim=1)
        source_len = (src != PAD_ID).sum(dim=1)
        x = torch.cat([self._embed_source(src), self._embed_target(tgt_in, source_len, 0)], dim=1)
        x = dropout(x, self.dropout, self.training)
        mask = self._mask(src != PAD_ID, tgt_in.shape[1])
        index = self._sequence_index(src, tgt_in, source_len)
        positions = self._position_info(index, index)
        for layer in self.layers:
            x = layer(x, mask, positions=positions)
        return self._output(x)

    # ------------------------------------------------------------------ search

    def encode(self, src: Tensor) -> DecoderOnlyState:
        """Run the source ``(B, S)`` (ids, EOS, padding) through the stack once, keeping its
        keys/values; the first ``decode_step`` feeds the BOS that separates the target (with
        ``model.separator: none``, the prompt's last token instead)."""
        first = None
        if self.prompt:
            src, first = self._split_prompt(src)
        valid = src != PAD_ID
        state = DecoderOnlyState(source_mask=valid[:, None, None, :], source_len=valid.sum(dim=1),
                                 kv=[[] for _ in self.layers], first=first)
        x = dropout(self._embed_source(src), self.dropout, self.training)
        mask = self._mask(valid, 0)
        index = self._source_index(src)
        positions = self._position_info(index, index)
        for layer, kv in zip(self.layers, state.kv, strict=True):
            x = layer(x, mask, kv, positions)
        return state

    def decode_step(self, tokens: Tensor, state: DecoderOnlyState) -> Tensor:
        """Feed ``(B, t)`` new target tokens (usually t = 1); return logits ``(B, V)`` of the
        last one. Extends ``state``'s cache: neither source nor target prefix is recomputed."""
        past, new = state.length, tokens.shape[1]
        if past == 0 and state.first is not None:  # the prompt's last token stands for the BOS
            tokens = torch.cat([state.first[:, None], tokens[:, 1:]], dim=1)
        x = dropout(self._embed_target(tokens, state.source_len, past), self.dropout, self.training)
        # New target positions see the real source, the target so far and themselves.
        batch, device = tokens.shape[0], tokens.device
        target = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(past)
        mask = torch.cat([state.source_mask.expand(batch, 1, new, -1), target.expand(batch, 1, new, -1)], dim=-1)
        positions = None
        if self.rotary is not None or self.relative is not None:
            source = state.source_mask[:, 0, 0]
            keys = self._sequence_index(source, tokens.new_zeros(batch, past + new), state.source_len)
            positions = self._position_info(keys[..., -new:], keys)
        for layer, kv in zip(self.layers, state.kv, strict=True):
            x = layer(x, mask, kv, positions)
        state.length += new
        return self.output_proj(self._output(x[:, -1]))

    # ------------------------------------------------------------------ internals

    def _embed_source(self, src: Tensor) -> Tensor:
        """Scaled embeddings plus positions ``0 .. S - 1``, ``(B, S, D)``."""
        return self._normed(self._added(self.src_embed(src) * self.scale, self._source_index(src)))

    def _embed_target(self, ids: Tensor, source_len: Tensor, past: int) -> Tensor:
        """Scaled embeddings of target ids ``(B, t)`` at target positions ``past ..``, plus their
        positions (``_target_index``)."""
        return self._normed(self._added(self.tgt_embed(ids) * self.scale, self._target_index(ids, source_len, past)))

    def _split_prompt(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``model.separator: none``: the source ``(B, S)`` (prompt ids, EOS, padding) without its
        last prompt token and its EOS (padding there), and that last token ``(B,)``, which takes
        the BOS's place: the target continues the prompt, at the positions that follow it."""
        lengths = (src != PAD_ID).sum(dim=1) - 1  # the prompt's, without the EOS
        if int(lengths.min()) < 2:  # a source row of padding alone would attend to nothing
            raise ValueError("separator none: every prompt needs at least two tokens")
        first = src.gather(1, (lengths - 1)[:, None])[:, 0]
        kept = torch.arange(src.shape[1], device=src.device)[None, :] < (lengths - 1)[:, None]
        return src.masked_fill(~kept, PAD_ID), first

    def _output(self, x: Tensor) -> Tensor:
        """The stack's output: its final norm, then ``model.scale_output``'s factor."""
        x = self.layer_norm(x)
        return x * self.output_scale if self.output_scale != 1.0 else x

    def _source_index(self, src: Tensor) -> Tensor:
        """Positions ``(S,)`` of the source ``(B, S)``: ``0 .. S - 1``."""
        return torch.arange(src.shape[1], device=src.device)

    def _target_index(self, ids: Tensor, source_len: Tensor, past: int) -> Tensor:
        """Positions of target ids ``(B, t)`` at target steps ``past ..``: from 0 (``(t,)``), or
        after each row's ``source_len`` real source tokens (``(B, t)``)."""
        steps = torch.arange(past, past + ids.shape[1], device=ids.device)
        return steps if self.restart else source_len[:, None] + steps

    def _sequence_index(self, src: Tensor, tgt: Tensor, source_len: Tensor) -> Tensor:
        """Positions of ``source target`` (``src`` ``(B, S)``, ``tgt`` ``(B, T)`` from the BOS):
        ``(S + T,)``, or ``(B, S + T)`` where the target continues after each source."""
        source, target = self._source_index(src), self._target_index(tgt, source_len, 0)
        if target.dim() == 2:
            source = source.expand(target.shape[0], -1)
        return torch.cat([source, target], dim=-1)

    def _added(self, x: Tensor, index: Tensor) -> Tensor:
        """``x`` plus the position embeddings of ``index`` where they are added to the tokens (else
        ``x``, the positions still checked against the table)."""
        embeddings = self._positions(index)
        return x + embeddings if self.positions.added else x

    def _position_info(self, queries: Tensor, keys: Tensor) -> PositionInfo | None:
        """Rotary angles of the ``queries``' positions, or the relative bias from them to
        ``keys``' (each ``(L,)`` or ``(B, L)``); None where positions are added to the
        embeddings."""
        if self.rotary is not None:
            return PositionInfo(rotary=self.rotary(queries))
        if self.relative is not None:
            return PositionInfo(bias=self.relative(queries, keys))
        return None

    def _normed(self, x: Tensor) -> Tensor:
        return x if self.embedding_norm is None else self.embedding_norm(x)

    def _positions(self, index: Tensor) -> Tensor:
        """Position embeddings of ``index`` (any shape), refusing positions beyond the table."""
        if index.numel() and int(index.max()) >= self.cfg.max_positions:
            raise ValueError(f"sequence of {int(index.max()) + 1} positions exceeds "
                             f"max_positions={self.cfg.max_positions}")
        return self.positions.weight[index]

    def _mask(self, source_valid: Tensor, target_len: int) -> Tensor:
        """``(B, 1, S + T, S + T)`` attention mask over ``source target``: keys are real tokens,
        at or before the query, or anywhere in the source for a source query of a prefix LM
        (target queries see the whole source anyway, as it comes first)."""
        batch, source_len = source_valid.shape
        length, device = source_len + target_len, source_valid.device
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if self.bidirectional:
            allowed[:source_len, :source_len] = True
        keys = torch.cat([source_valid, source_valid.new_ones(batch, target_len)], dim=1)
        return allowed[None, None] & keys[:, None, None, :]

    # ------------------------------------------------------------------ search limits

    def max_source_length(self) -> int:
        """Source subwords the model accepts: its EOS takes one more position, and where target
        positions follow the source's, so does at least the target's BOS."""
        return self.cfg.max_positions - 1 - int(self.cfg.target_follows_source)

    def positions_left(self, src: Tensor) -> Tensor:
        """``(B,)`` positions left for the target (its BOS included) after each source row (with
        ``model.separator: none``, the prompt's last token stands for the BOS, and no EOS is fed)."""
        if self.restart:
            return torch.full((src.shape[0],), self.cfg.max_positions, dtype=torch.long, device=src.device)
        return self.cfg.max_positions - (src != PAD_ID).sum(dim=1) + 2 * int(self.prompt)
