"""The building blocks every model family shares, public so that a family file imports them
(fairseq2's layering: building blocks -> a generic Transformer stack -> a family).

Shapes: B batch, L length, D d_model, H heads. Token id 0 is padding (see ``mtkit.tokenizer``).

Parameter names follow Hugging Face's Marian (``q_proj``, ``self_attn_layer_norm``, ...)
with query/key/value fused for speed, so weights map one-to-one onto Marian and CTranslate2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

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


Norm: TypeAlias = nn.LayerNorm | nn.RMSNorm


def make_norm(cfg: ModelConfig) -> Norm:
    """A norm over ``d_model`` of ``model.norm_type``: LayerNorm (with a bias unless
    ``model.bias`` is off) or RMSNorm, with ``model.norm_eps``."""
    if cfg.norm_type == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def embedding_norm(cfg: ModelConfig) -> Norm | None:
    """The norm on token-plus-position embeddings where ``model.embedding_norm`` asks for one
    (mBART's ``layernorm_embedding``); None otherwise."""
    return make_norm(cfg) if cfg.embedding_norm else None


def final_norm(cfg: ModelConfig) -> Norm | nn.Identity:
    """The norm at the end of a stack: pre-norm stacks end with one; post-norm layers are
    already normalised."""
    return make_norm(cfg) if cfg.norm == "pre" else nn.Identity()


def output_scale(cfg: ModelConfig) -> float:
    """What the decoder's output is multiplied by before the output projection
    (``model.scale_output``)."""
    return cfg.d_model**-0.5 if cfg.scale_output else 1.0


def output_projection(cfg: ModelConfig, tgt_vocab_size: int) -> nn.Linear:
    """The output projection, with a bias where ``model.output_bias`` asks for one (Marian's
    ``final_logits_bias``); the bias starts at zero."""
    return nn.Linear(cfg.d_model, tgt_vocab_size, bias=cfg.output_bias)


def init_parameters(model: nn.Module, embeddings: list[nn.Embedding], d_model: int) -> None:
    """Xavier-uniform linear weights and zero biases; embeddings (and relative position biases)
    drawn from N(0, d_model^-0.5), the PAD row zero (a shared table once)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RelativeBias):
            nn.init.normal_(module.embed.weight, std=d_model**-0.5)
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


ADDED_POSITIONS = ("sinusoidal", "sinusoidal_fairseq", "learned")
"""``model.positions`` that add an embedding to the tokens' (the others act inside attention)."""


class Positions(nn.Module):
    """Position embeddings added to the (scaled) token embeddings: a trained table or a fixed one
    (``model.positions``); ``added`` is False (and the embeddings zero) for positions that act
    inside attention (``Rotary``, ``RelativeBias``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.learned = cfg.positions == "learned"
        self.added = cfg.positions in ADDED_POSITIONS
        if self.learned:
            self.weight = nn.Parameter(torch.empty(cfg.max_positions, cfg.d_model))
            nn.init.normal_(self.weight, std=cfg.d_model**-0.5)
        elif self.added:
            table = (fairseq_sinusoidal_table if cfg.positions == "sinusoidal_fairseq" else sinusoidal_table)
            self.register_buffer("weight", table(cfg.max_positions, cfg.d_model), persistent=False)
        else:
            self.register_buffer("weight", torch.zeros(cfg.max_positions, 1), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """``(length, D)`` embeddings of positions ``offset .. offset + length - 1`` (``(length,
        1)`` zeros where none are added)."""
        return self.weight[offset : offset + length]


class Rotary(nn.Module):
    """Rotary position embeddings (``model.positions: rope``): each pair of query and key
    dimensions ``(i, i + head_dim / 2)`` rotated by position times ``rope_base ** (-2i /
    head_dim)`` (the half-split layout of transformers' Llama). The angles are computed in
    float32 at each call, whatever the model's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.base = cfg.attention_head_dim, cfg.rope_base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``(1, 1, L, head_dim)`` for ``positions`` ``(L,)``, or ``(B, 1, L,
        head_dim)`` for ``(B, L)``: what ``rotate`` takes."""
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        freqs = 1.0 / (self.base ** (steps / self.head_dim))
        angles = positions.float()[..., None] * freqs  # (..., L, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)
        angles = angles[None, None] if positions.dim() == 1 else angles[:, None]
        return angles.cos(), angles.sin()


def rotate(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """``x`` ``(B, H, L, head_dim)`` rotated by ``Rotary``'s cos and sin for its L positions."""
    cos, sin = (t.to(x.dtype) for t in rotary)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class RelativeBias(nn.Module):
    """T5's relative position bias (``model.positions: relative``): a trained scalar per head
    and bucket of the distance from query to key, added to the attention logits. Buckets: the
    first half of a direction's buckets hold distances 0, 1, 2, ... exactly, the rest grow
    logarithmically up to ``relative_max_distance``; ``bidirectional`` (an encoder, a prefix LM)
    gives keys before and after the query buckets of their own, else a key after the query
    counts as distance 0 (a causal stack never sees one)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embed = nn.Embedding(cfg.relative_buckets, cfg.heads)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """The bias ``(1 or B, H, Lq, Lk)`` for ``query_positions`` ``(Lq,)`` or ``(B, Lq)`` and
        ``key_positions`` ``(Lk,)`` or ``(B, Lk)``."""
        distance = key_positions[..., None, :] - query_positions[..., :, None]  # (..., Lq, Lk)
        bias = self.embed(self.bucket(distance))  # (..., Lq, Lk, H)
        bias = bias.movedim(-1, -3)
        return bias if bias.dim() == 4 else bias[None]

    def bucket(self, distance: Tensor) -> Tensor:
        """Bucket ids of key-minus-query distances."""
        buckets, offset = self.buckets, torch.zeros_like(distance)
        if self.bidirectional:
            buckets //= 2
            offset = (distance > 0).long() * buckets
            distance = distance.abs()
        else:
            distance = (-distance).clamp(min=0)
        exact = buckets // 2
        scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (scaled * (buckets - exact)).long()).clamp(max=buckets - 1)
        return offset + torch.where(distance < exact, distance, far)


@dataclass
class PositionInfo:
    """How a stack's self-attention sees positions, computed once per call for every layer:
    ``rotary``: cos and sin of the new queries' and keys' positions (``Rotary``); ``bias``: the
    relative position bias ``(1 or B, H, new, keys)`` (``RelativeBias``)."""

    rotary: tuple[Tensor, Tensor] | None = None
    bias: Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``, with ``model.kv_heads``
    key/value heads (grouped-query attention where fewer than the query heads).

    Self-attention projects query, key and value with one fused matrix (``qkv_proj``: the
    query's ``heads * head_dim`` rows, then the keys' and the values' ``kv_heads * head_dim``
    each; ``head_dim`` is ``model.head_dim``, by default D/H); cross-attention
    projects the query from the decoder and key/value (``kv_proj``) from the encoder output,
    once per sentence.
    """

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.heads, self.head_dim, self.cross = cfg.heads, cfg.attention_head_dim, cross
        self.kv_heads, self.dropout = cfg.key_value_heads, cfg.attention_dropout
        self.scale = self.head_dim**-0.5 if cfg.scale_attention else 1.0
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        if cross:
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
            self.kv_proj = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.bias)
        else:
            self.qkv_proj = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)

    def split_heads(self, x: Tensor, heads: int | None = None) -> Tensor:
        """``(B, L, heads * D/H)`` -> ``(B, heads, L, D/H)`` (``heads``: the query heads)."""
        batch, length, _ = x.shape
        return x.view(batch, length, heads or self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the encoder output, each ``(B, kv_heads, S, D/H)``."""
        key, value = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(key, self.kv_heads), self.split_heads(value, self.kv_heads)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        cache: list[Tensor] | None = None,
        positions: PositionInfo | None = None,
    ) -> Tensor:
        """Attend from ``x`` ``(B, L, D)``.

        mask: boolean ``(B, 1, 1, S)``, True where a key may be attended (padding is False).
        kv: precomputed cross-attention keys/values (required when ``cross``).
        cache: self-attention keys/values of earlier steps ``[k, v]``, extended in place (keys
        already rotated).
        positions: rotary angles of the new positions, or a relative bias (self-attention).
        """
        rows, length = x.shape[0], x.shape[1]
        rotary = positions.rotary if positions is not None else None
        bias = positions.bias if positions is not None else None
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
            query, key, value = self.qkv_proj(x).split(self.split, dim=-1)
            query, key, value = self.split_heads(query), self.split_heads(key, self.kv_heads), self.split_heads(
                value, self.kv_heads)
            if rotary is not None:
                query, key = rotate(query, rotary), rotate(key, rotary)
            if cache is not None:
                if cache:
                    key = torch.cat([cache[0], key], dim=2)
                    value = torch.cat([cache[1], value], dim=2)
                cache[:] = [key, value]
        if bias is not None or self.kv_heads != self.heads:
            out = self._attend_grouped(query, key, value, mask, causal, bias)
        elif length == 1 and not self.training and query.device.type == "cpu":
            # One query per row (incremental decoding): two small matmuls beat the CPU kernel
            # of scaled_dot_product_attention, whose set-up dominates at this size.
            weights = (query @ key.transpose(-1, -2)) * self.scale
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
            scale=None if self.scale != 1.0 else 1.0,  # None: its own 1/sqrt(head_dim), as before the option
        )

    def _attend_grouped(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool,
                        bias: Tensor | None) -> Tensor:
        """Attention written out, for what the fused kernel does not take as it is: ``kv_heads``
        key/value heads, each serving ``heads / kv_heads`` query heads (the keys are not
        repeated: the query heads of a group become more query rows), and a relative position
        bias ``(1 or B, H, L, S)`` on the logits. Softmax in float32."""
        batch, _, length, dim = query.shape
        group = self.heads // self.kv_heads
        query = query.reshape(batch, self.kv_heads, group * length, dim)
        weights = (query @ key.transpose(-1, -2)).float() * self.scale  # (B, KV, G*L, S)
        weights = weights.view(batch, self.kv_heads, group, length, -1)
        if bias is not None:
            weights = weights + bias.float().reshape(bias.shape[0], self.kv_heads, group, length, -1)
        keys = weights.shape[-1]
        if causal and mask is None:
            mask = torch.ones(1, 1, length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
        if mask is not None:
            # mask: (L, S) or (B or 1, 1, 1 or L, S), broadcast over the key/value heads and groups
            mask = mask.view((1, 1, *mask.shape)) if mask.dim() == 2 else mask
            weights = weights.masked_fill(~mask[:, :, None], float("-inf"))
        weights = dropout(weights.softmax(dim=-1).to(value.dtype), self.dropout, self.training)
        out = weights.view(batch, self.kv_heads, group * length, keys) @ value
        return out.view(batch, self.heads, length, dim)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}
"""``model.activation``: gelu is the exact (erf) GELU, silu is Marian's and Hugging Face's swish;
swiglu and geglu are the activations of a gated feed-forward (``GATED``)."""
GATED = ("swiglu", "geglu")
"""``model.activation``s of a gated feed-forward."""


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))``, or gated (``model.activation`` swiglu, geglu): ``fc2(act(gate(x)) *
    fc1(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias) if cfg.activation in GATED else None
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.activation = ACTIVATIONS[cfg.activation]
        self.dropout = cfg.activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(self.fc1(x) if self.gate is None else self.gate(x))
        if self.gate is not None:
            hidden = hidden * self.fc1(x)
        return self.fc2(dropout(hidden, self.dropout, self.training))


class Block(nn.Module):
    """Self-attention then feed-forward, each a residual sub-layer: the encoder-decoder's
    encoder layer, and the decoder-only model's block (whose attention keeps a key/value cache)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm, self.dropout = cfg.norm == "pre", cfg.dropout
        self.self_attn = Attention(cfg, cross=False)
        self.self_attn_layer_norm = make_norm(cfg)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = make_norm(cfg)

    def forward(self, x: Tensor, mask: Tensor, cache: list[Tensor] | None = None,
                positions: PositionInfo | None = None) -> Tensor:
        """mask: boolean, True where a key may be attended (``(B, 1, 1, L)`` or ``(B, 1, new,
        keys)``); cache: this block's ``[k, v]`` of earlier positions, extended in place;
        positions: see ``PositionInfo``."""
        x = residual(x, self.self_attn_layer_norm, self.pre_norm, self.dropout, self.training,
                     lambda h: self.self_attn(h, mask=mask, cache=cache, positions=positions))
        return residual(x, self.final_layer_norm, self.pre_norm, self.dropout, self.training, self.ffn)


def residual(x: Tensor, norm: Norm, pre_norm: bool, rate: float, training: bool,
             sublayer: Callable[[Tensor], Tensor]) -> Tensor:
    """``x + sublayer(norm(x))`` (pre-norm) or ``norm(x + sublayer(x))`` (post-norm)."""
    if pre_norm:
        return x + dropout(sublayer(norm(x)), rate, training)
    return norm(x + dropout(sublayer(x), rate, training))
