"""The building blocks every model family shares, public so that a family file imports them
(fairseq2's layering: building blocks -> a generic Transformer stack -> a family).

Shapes: B batch, L length, D d_model, H heads. Token id 0 is padding (see ``mtkit.tokenizer``).

Parameter names follow Hugging Face's Marian (``q_proj``, ``self_attn_layer_norm``, ...)
with query/key/value fused for speed, so weights map one-to-one onto Marian and CTranslate2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtkit.config import ModelConfig
from mtkit.vocab import PAD_ID


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout``, with a faster mask on CPU.

    On CPU ``F.dropout`` draws one Bernoulli sample per element, a visible share of a training
    step (docs/benchmarks.md). Here the mask comes from 16 random bits per element, drawn 64 at
    a time, several times cheaper: an element is
    kept when its bits reach ``round(p * 2**16)``, so the drop rate is ``p`` to within
    2**-17 and the scale uses that exact rate. Other devices use ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    levels = 1 << 16  # one int16 per element: values -2**15 .. 2**15 - 1, uniform
    drop = round(p * levels)  # this many of the levels drop an element
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= drop - levels // 2
    # A Python scale multiplies in float before each element is rounded to x's dtype; a scale
    # cast to bf16 first (1.1111 -> 1.109375) would shrink every kept activation alike.
    return x.mul(levels / (levels - drop)).mul_(keep)


def make_embeddings(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int,
                    joint_vocab: bool) -> tuple[nn.Embedding, nn.Embedding]:
    """Source and target embedding tables: one table twice when ``share_embeddings`` is on and
    both sides use one vocabulary."""
    src = nn.Embedding(src_vocab_size, cfg.d_model, padding_idx=PAD_ID)
    share = cfg.share_embeddings and joint_vocab and src_vocab_size == tgt_vocab_size
    return src, src if share else nn.Embedding(tgt_vocab_size, cfg.d_model, padding_idx=PAD_ID)


def embedding_norm(cfg: ModelConfig) -> nn.LayerNorm | None:
    """The layer norm on token-plus-position embeddings where ``model.embedding_norm`` asks for
    one (mBART's ``layernorm_embedding``); None otherwise."""
    return nn.LayerNorm(cfg.d_model) if cfg.embedding_norm else None


def output_projection(cfg: ModelConfig, tgt_vocab_size: int) -> nn.Linear:
    """The output projection, with a bias where ``model.output_bias`` asks for one (Marian's
    ``final_logits_bias``); the bias starts at zero."""
    return nn.Linear(cfg.d_model, tgt_vocab_size, bias=cfg.output_bias)


def init_parameters(model: nn.Module, embeddings: list[nn.Embedding], d_model: int) -> None:
    """Xavier-uniform linear weights and zero biases; embeddings drawn from N(0, d_model^-0.5)
    with the PAD row zero (a shared table once)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for embed in set(embeddings):
        nn.init.normal_(embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            embed.weight[PAD_ID].zero_()


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """``(length, dim)`` positions as in Marian: sines in the first half, cosines in the second."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angles)
    table[:, half : 2 * half] = torch.cos(angles)
    return table.float()


def fairseq_sinusoidal_table(length: int, dim: int, padding_idx: int = 1) -> Tensor:
    """``(length, dim)`` positions as fairseq (and so M2M100 and NLLB) computes them, in float32
    as it does: frequencies ``10000 ** (-i / (dim / 2 - 1))``, sines then cosines, a zero column
    for an odd ``dim``. fairseq numbers positions after its padding index: row ``i`` here is its
    position ``padding_idx + 1 + i``."""
    half = dim // 2
    rate = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -rate)
    steps = torch.arange(padding_idx + 1, padding_idx + 1 + length, dtype=torch.int64).float()
    angles = steps[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, dim % 2))


class Positions(nn.Module):
    """Position embeddings added to the (scaled) token embeddings: a trained table or a fixed one
    (``model.positions``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.learned = cfg.positions == "learned"
        if self.learned:
            self.weight = nn.Parameter(torch.empty(cfg.max_positions, cfg.d_model))
            nn.init.normal_(self.weight, std=cfg.d_model**-0.5)
        else:
            table = (fairseq_sinusoidal_table if cfg.positions == "sinusoidal_fairseq" else sinusoidal_table)
            self.register_buffer("weight", table(cfg.max_positions, cfg.d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """``(length, D)`` embeddings of positions ``offset .. offset + length - 1``."""
        return self.weight[offset : offset + length]


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    Self-attention projects query, key and value with one fused matrix (``qkv_proj``);
    cross-attention projects the query from the decoder and key/value (``kv_proj``) from the
    encoder output, once per sentence.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.heads, self.head_dim, self.dropout, self.cross = heads, d_model // heads, dropout, cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        """``(B, L, D)`` -> ``(B, H, L, D/H)``."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the encoder output, each ``(B, H, S, D/H)``."""
        key, value = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(key), self.split_heads(value)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        cache: list[Tensor] | None = None,
    ) -> Tensor:
        """Attend from ``x`` ``(B, L, D)``.

        mask: boolean ``(B, 1, 1, S)``, True where a key may be attended (padding is False).
        kv: precomputed cross-attention keys/values (required when ``cross``).
        cache: self-attention keys/values of earlier steps ``[k, v]``, extended in place.
        """
        rows, length = x.shape[0], x.shape[1]
        if self.cross:
            assert kv is not None
            query = self.split_heads(self.q_proj(x))
            key, value = kv
            if key.shape[0] != rows:
                # The beams of a sentence share its encoder keys and values (``DecoderState.beams``):
                # their queries become more query positions of that sentence.
                group = rows // key.shape[0]
                query = query.reshape(key.shape[0], group, self.heads, length, self.head_dim).transpose(1, 2)
                query = query.reshape(key.shape[0], self.heads, group * length, self.head_dim)
        else:
            query, key, value = (self.split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
            if cache is not None:
                if cache:
                    key = torch.cat([cache[0], key], dim=2)
                    value = torch.cat([cache[1], value], dim=2)
                cache[:] = [key, value]
        if length == 1 and not self.training and query.device.type == "cpu":
            # One query per row (incremental decoding): two small matmuls beat the CPU kernel
            # of scaled_dot_product_attention, whose set-up dominates at this size.
            weights = (query @ key.transpose(-1, -2)) * self.head_dim**-0.5
            if mask is not None:
                weights = weights.masked_fill(~mask, float("-inf"))
            out = weights.softmax(dim=-1) @ value
        elif self.training and query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # PyTorch's CPU attention backward is several times slower in bf16 than in fp32
            # (docs/benchmarks.md): attend in fp32, project in bf16.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(query.float(), key.float(), value.float(), mask, causal)
        else:
            out = self._attend(query, key, value, mask, causal)
        if out.shape[0] != rows:  # shared keys and values: back to one row per beam
            out = out.view(out.shape[0], self.heads, rows // out.shape[0], length, self.head_dim).transpose(1, 2)
        out = out.reshape(rows, self.heads, length, self.head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(rows, length, -1))

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """``scaled_dot_product_attention`` with this layer's dropout while training."""
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
"""``model.activation``: gelu is the exact (erf) GELU, silu is Marian's and Hugging Face's swish."""


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.activation = ACTIVATIONS[cfg.activation]
        self.dropout = cfg.activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        hidden = dropout(self.activation(self.fc1(x)), self.dropout, self.training)
        return self.fc2(hidden)


class Block(nn.Module):
    """Self-attention then feed-forward, each a residual sub-layer: the encoder-decoder's
    encoder layer, and the decoder-only model's block (whose attention keeps a key/value cache)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm, self.dropout = cfg.norm == "pre", cfg.dropout
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout, cross=False)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, mask: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """mask: boolean, True where a key may be attended (``(B, 1, 1, L)`` or ``(B, 1, new,
        keys)``); cache: this block's ``[k, v]`` of earlier positions, extended in place."""
        x = residual(x, self.self_attn_layer_norm, self.pre_norm, self.dropout, self.training,
                     lambda h: self.self_attn(h, mask=mask, cache=cache))
        return residual(x, self.final_layer_norm, self.pre_norm, self.dropout, self.training, self.ffn)


def residual(x: Tensor, norm: nn.LayerNorm, pre_norm: bool, rate: float, training: bool,
             sublayer: Callable[[Tensor], Tensor]) -> Tensor:
    """``x + sublayer(norm(x))`` (pre-norm) or ``norm(x + sublayer(x))`` (post-norm)."""
    if pre_norm:
        return x + dropout(sublayer(norm(x)), rate, training)
    return norm(x + dropout(sublayer(x), rate, training))
