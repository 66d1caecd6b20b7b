"""The encoder-decoder Transformer (Vaswani et al., 2017), read top to bottom.

Shapes: B batch, S source length, T target length, D d_model, H heads, V vocabulary.
Token id 0 is padding (see ``mtkit.tokenizer``).

- ``forward(src, tgt_in)`` returns logits ``(B, T, V)`` for training: teacher forcing with a
  causal decoder.
- ``encode(src)`` and ``decode_step(tokens, state)`` are what search uses: the encoder runs
  once; each decoder step feeds only the newest token, reading earlier keys/values from the
  state's self-attention cache and the cross-attention keys/values computed once per sentence.

Encoder layers are ``mtkit.models.layers.Block``; decoder layers add cross-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from mtkit.config import ModelConfig
from mtkit.models.layers import (
    Attention,
    Block,
    FeedForward,
    Norm,
    PositionInfo,
    Positions,
    RelativeBias,
    Rotary,
    dropout,
    embedding_norm,
    final_norm,
    init_parameters,
    make_embeddings,
    make_norm,
    output_projection,
    output_scale,
    residual,
)
from mtkit.vocab import PAD_ID


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm, self.dropout = cfg.norm == "pre", cfg.dropout
        self.self_attn = Attention(cfg, cross=False)
        self.self_attn_layer_norm = make_norm(cfg)
        self.encoder_attn = Attention(cfg, cross=True)
        self.encoder_attn_layer_norm = make_norm(cfg)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = make_norm(cfg)

    def forward(
        self,
        x: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        src_mask: Tensor,
        cache: list[Tensor] | None,
        self_mask: Tensor | None,
        causal: bool,
        positions: PositionInfo | None = None,
    ) -> Tensor:
        """cache: this layer's self-attention keys/values (None when training); self_mask and
        causal: how new positions may attend to earlier ones (see ``Transformer._decode``);
        positions: rotary angles or relative bias of the self-attention."""
        x = residual(x, self.self_attn_layer_norm, self.pre_norm, self.dropout, self.training,
                      lambda h: self.self_attn(h, mask=self_mask, causal=causal, cache=cache, positions=positions))
        x = residual(x, self.encoder_attn_layer_norm, self.pre_norm, self.dropout, self.training,
                      lambda h: self.encoder_attn(h, mask=src_mask, kv=cross_kv))
        return residual(x, self.final_layer_norm, self.pre_norm, self.dropout, self.training, self.ffn)



@dataclass
class DecoderState:
    """What incremental decoding carries between steps, for a batch of B rows.

    memory_mask: ``(B / beams, 1, 1, S)`` source padding mask.
    cross_kv: per decoder layer, encoder keys/values ``(B / beams, H, S, D/H)``, computed once.
    self_kv: per decoder layer, ``[k, v]`` of the target prefix ``(B, H, t, D/H)``.
    length: target positions decoded so far.
    beams: rows per sentence: the ``beams`` consecutive rows of a sentence share its source
    mask and encoder keys/values, which are kept once.
    """

    memory_mask: Tensor
    cross_kv: list[tuple[Tensor, Tensor]]
    self_kv: list[list[Tensor]]
    length: int = 0
    beams: int = 1

    def select(self, rows: Tensor) -> DecoderState:
        """Keep (and reorder or repeat) batch rows, e.g. sentences still searched. With
        ``beams`` > 1, ``rows`` keeps whole sentences: groups of ``beams`` consecutive rows."""
        sources = rows if self.beams == 1 else rows[:: self.beams] // self.beams
        return DecoderState(
            memory_mask=self.memory_mask.index_select(0, sources),
            cross_kv=[(k.index_select(0, sources), v.index_select(0, sources)) for k, v in self.cross_kv],
            self_kv=[[t.index_select(0, rows) for t in kv] for kv in self.self_kv],
            length=self.length,
            beams=self.beams,
        )

    def repeat(self, beams: int) -> DecoderState:
        """Each row as ``beams`` rows (beam search), its encoder keys and values shared."""
        assert self.beams == 1
        return DecoderState(memory_mask=self.memory_mask, cross_kv=self.cross_kv,
                            self_kv=[[t.repeat_interleave(beams, dim=0) for t in kv] for kv in self.self_kv],
                            length=self.length, beams=beams)

    def reorder_self(self, rows: Tensor) -> None:
        """Reorder only the self-attention cache (cross-attention rows stay, as beams of one
        sentence share their encoder output)."""
        self.self_kv = [[t.index_select(0, rows) for t in kv] for kv in self.self_kv]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (cross- and self-attention)."""
        tensors = [t for kv in self.cross_kv for t in kv] + [t for kv in self.self_kv for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


class Transformer(nn.Module):
    """Encoder-decoder Transformer. Build with ``Transformer(cfg, src_vocab, tgt_vocab)``."""

    has_encoder: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True):
        """``joint_vocab``: both sides use one SentencePiece model, so embeddings may be shared
        (equal sizes alone do not make two vocabularies the same)."""
        super().__init__()
        self.cfg = cfg
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.dropout = cfg.dropout
        self.src_embed, self.tgt_embed = make_embeddings(cfg, src_vocab_size, tgt_vocab_size, joint_vocab)
        self.positions = Positions(cfg)
        # The decoder's own table where the encoder's is not shared (mBART's learned positions).
        self.decoder_positions = None if cfg.share_positions else Positions(cfg)
        self.encoder_embedding_norm, self.decoder_embedding_norm = embedding_norm(cfg), embedding_norm(cfg)
        # Positions inside attention: rotary angles, or one relative bias table per stack.
        self.rotary = Rotary(cfg) if cfg.positions == "rope" else None
        relative = cfg.positions == "relative"
        self.encoder_relative = RelativeBias(cfg, bidirectional=True) if relative else None
        self.decoder_relative = RelativeBias(cfg, bidirectional=False) if relative else None
        self.encoder_layers = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.encoder_layer_norm, self.decoder_layer_norm = final_norm(cfg), final_norm(cfg)
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
        """Logits ``(B, T, V)`` for source ids ``(B, S)`` and decoder input ids ``(B, T)``."""
        return self.output_proj(self.features(src, tgt_in))

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Decoder output ``(B, T, D)`` before the output projection. Training projects only
        the non-padding positions, which saves the largest matmul's share of padding."""
        return self._decode(tgt_in, self.encode(src), cache=False)

    # ------------------------------------------------------------------ search

    def encode(self, src: Tensor) -> DecoderState:
        """Run the encoder on ``(B, S)`` ids; return a fresh decoder state for these rows."""
        mask = (src != PAD_ID)[:, None, None, :]
        x = self._embed(self.src_embed, self.positions, self.encoder_embedding_norm, src, offset=0)
        steps = torch.arange(src.shape[1], device=src.device)
        positions = self._position_info(self.encoder_relative, steps, steps)
        for layer in self.encoder_layers:
            x = layer(x, mask, positions=positions)
        memory = self.encoder_layer_norm(x)
        cross_kv = [cast(DecoderLayer, layer).encoder_attn.project_kv(memory) for layer in self.decoder_layers]
        return DecoderState(memory_mask=mask, cross_kv=cross_kv, self_kv=[[] for _ in self.decoder_layers])

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed ``(B, t)`` new target tokens (usually t = 1); return logits ``(B, V)`` of the
        last one. Extends ``state``'s cache: the prefix is never recomputed."""
        hidden = self._decode(tokens, state, cache=True)
        state.length += tokens.shape[1]
        return self.output_proj(hidden[:, -1])

    def max_source_length(self) -> int:
        """Source subwords the encoder accepts (its EOS takes one more position)."""
        return self.cfg.max_positions - 1

    def positions_left(self, src: Tensor) -> Tensor:
        """``(B,)`` positions for the target (its BOS included): the decoder has its own."""
        return torch.full((src.shape[0],), self.cfg.max_positions, dtype=torch.long, device=src.device)

    # ------------------------------------------------------------------ internals

    def _embed(self, table: nn.Embedding, positions: Positions, norm: Norm | None, ids: Tensor,
               offset: int) -> Tensor:
        length = ids.shape[1]
        if offset + length > self.cfg.max_positions:
            raise ValueError(f"sequence of {offset + length} tokens exceeds max_positions={self.cfg.max_positions}")
        x = table(ids) * self.scale
        if positions.added:
            x = x + positions(length, offset)
        if norm is not None:
            x = norm(x)
        return dropout(x, self.dropout, self.training)

    def _decode(self, tokens: Tensor, state: DecoderState, cache: bool) -> Tensor:
        past, new = (state.length if cache else 0), tokens.shape[1]
        x = self._embed(self.tgt_embed, self.decoder_positions or self.positions, self.decoder_embedding_norm, tokens,
                        offset=past)
        # Without a prefix, a causal mask is implicit; one new token sees every cached one;
        # several new tokens after a prefix need the causal mask shifted by the prefix.
        self_mask, causal = None, past == 0 and new > 1
        if past and new > 1:
            self_mask = torch.ones(new, past + new, dtype=torch.bool, device=tokens.device).tril(past)
        positions = self._position_info(self.decoder_relative, torch.arange(past, past + new, device=tokens.device),
                                        torch.arange(past + new, device=tokens.device))
        for layer, cross_kv, kv in zip(self.decoder_layers, state.cross_kv, state.self_kv, strict=True):
            x = layer(x, cross_kv, state.memory_mask, kv if cache else None, self_mask, causal, positions)
        x = self.decoder_layer_norm(x)
        return x * self.output_scale if self.output_scale != 1.0 else x

    def _position_info(self, relative: RelativeBias | None, queries: Tensor, keys: Tensor) -> PositionInfo | None:
        """Rotary angles of the new ``queries``' positions, or the relative bias from them to
        ``keys``' (``(L,)`` each); None where positions are added to the embeddings."""
        if self.rotary is not None:
            return PositionInfo(rotary=self.rotary(queries))
        if relative is not None:
            return PositionInfo(bias=relative(queries, keys))
        return None
