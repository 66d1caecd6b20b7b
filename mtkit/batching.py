"""Token-based, length-bucketed batches of a prepared split.

A batch holds up to ``max_tokens`` padded tokens on its larger side: batch size times the
longest sentence (with BOS/EOS) of either side. Sentences are sorted by length (ties broken
at random, anew each epoch) and packed greedily, so sentences of equal length share a batch
and padding stays low; the order of the batches is then shuffled with a generator seeded by
``(seed, epoch)``, so an epoch's batches are a pure function of the seed and the epoch
number and a resumed run can skip straight to the batch where it stopped.

Tensors per batch: ``src`` ``(B, S)`` = ids + EOS; ``tgt_in`` ``(B, T)`` = BOS + ids;
``tgt_out`` ``(B, T)`` = ids + EOS; all right-padded with PAD_ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    src: Tensor
    """``(B, S)`` source ids followed by EOS."""
    tgt_in: Tensor
    """``(B, T)`` decoder input: BOS then target ids."""
    tgt_out: Tensor
    """``(B, T)`` expected output: target ids then EOS."""
    target_tokens: int
    """Non-padding positions of ``tgt_out`` (what the loss is normalised by)."""
    padded_tokens: int
    """``src.numel() + tgt_out.numel()``."""
    real_tokens: int
    """Non-padding source plus target positions."""

    def to(self, device: torch.device | str) -> Batch:
        def move(tensor: Tensor) -> Tensor:
            return tensor.to(device=device, non_blocking=True)

        return Batch(
            move(self.src), move(self.tgt_in), move(self.tgt_out),
            self.target_tokens, self.padded_tokens, self.real_tokens,
        )


class TokenizedCorpus:
    """The token ids of a prepared split held as two flat arrays plus offsets (from Arrow,
    without copying a Python list per sentence). ``src_lens``/``tgt_lens`` exclude BOS/EOS."""

    def __init__(self, src_values: np.ndarray, src_offsets: np.ndarray, tgt_values: np.ndarray,
                 tgt_offsets: np.ndarray):
        self.src_values = torch.from_numpy(src_values.astype(np.int64))
        self.tgt_values = torch.from_numpy(tgt_values.astype(np.int64))
        self.src_starts = src_offsets[:-1].astype(np.int64)
        self.tgt_starts = tgt_offsets[:-1].astype(np.int64)
        self.src_lens = np.diff(src_offsets).astype(np.int64)
        self.tgt_lens = np.diff(tgt_offsets).astype(np.int64)

    @classmethod
    def from_dataset(cls, dataset: Any) -> TokenizedCorpus:
        """From a prepared split (``mtkit.data.PreparedSplit``), a ``pyarrow.Table`` or a
        ``datasets.Dataset``, with list-of-int columns ``src_ids`` and ``tgt_ids``."""
        if hasattr(dataset, "with_format"):  # datasets.Dataset: its rows may be a selection
            table = dataset.with_format("arrow")[:]
        else:
            table = getattr(dataset, "table", dataset)
        arrays = []
        for column in ("src_ids", "tgt_ids"):
            ids = table.column(column).combine_chunks()
            # .offsets are absolute positions in .values (which ignores any slice offset).
            arrays += [np.asarray(ids.values), np.asarray(ids.offsets)]
        return cls(*arrays)

    @classmethod
    def from_lists(cls, src: list[list[int]], tgt: list[list[int]]) -> TokenizedCorpus:
        """From Python lists (tests, small inputs)."""

        def flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(r) for r in rows])
            values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
            return values, offsets

        return cls(*flat(src), *flat(tgt))

    @classmethod
    def concatenate(cls, parts: list[TokenizedCorpus]) -> TokenizedCorpus:
        """The pairs of ``parts``, one after another."""

        def side(values: list[Tensor], lens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            return torch.cat(values).numpy(), np.concatenate([[0], np.cumsum(np.concatenate(lens))])

        return cls(*side([p.src_values for p in parts], [p.src_lens for p in parts]),
                   *side([p.tgt_values for p in parts], [p.tgt_lens for p in parts]))

    def __len__(self) -> int:
        return len(self.src_lens)

    @property
    def sizes(self) -> np.ndarray:
        """``(N,)`` padded size of each pair: its longer side including BOS/EOS."""
        return np.maximum(self.src_lens, self.tgt_lens) + 1

    def ids(self, row: int) -> tuple[list[int], list[int]]:
        """The source and target ids of one pair."""
        src = self.src_values[self.src_starts[row] : self.src_starts[row] + self.src_lens[row]]
        tgt = self.tgt_values[self.tgt_starts[row] : self.tgt_starts[row] + self.tgt_lens[row]]
        return src.tolist(), tgt.tolist()

    def batch(self, indices: np.ndarray) -> Batch:
        """Collate the pairs ``indices`` into padded tensors (one vectorised gather per side)."""
        src_lens = torch.from_numpy(self.src_lens[indices])
        tgt_lens = torch.from_numpy(self.tgt_lens[indices])
        src = _gather(self.src_values, self.src_starts[indices], src_lens, width=int(src_lens.max()) + 1)
        ids = _gather(self.tgt_values, self.tgt_starts[indices], tgt_lens, width=int(tgt_lens.max()) + 1)
        rows = torch.arange(len(indices))
        src[rows, src_lens] = EOS_ID
        tgt_out = ids.clone()
        tgt_out[rows, tgt_lens] = EOS_ID
        tgt_in = torch.cat([torch.full((len(indices), 1), BOS_ID), ids[:, :-1]], dim=1)
        target = int(tgt_lens.sum()) + len(indices)
        real = int(src_lens.sum()) + len(indices) + target
        return Batch(src, tgt_in, tgt_out, target, src.numel() + tgt_out.numel(), real)


def _gather(values: Tensor, starts: np.ndarray, lens: Tensor, width: int) -> Tensor:
    """``(B, width)``: row i holds ``values[starts[i] : starts[i] + lens[i]]`` then PAD_ID."""
    positions = torch.arange(width)
    keep = positions[None, :] < lens[:, None]
    flat = torch.from_numpy(starts)[:, None] + positions[None, :]
    return torch.where(keep, values[flat.clamp_(max=len(values) - 1)], PAD_ID)


def pack(
    sizes: np.ndarray, order: np.ndarray, max_tokens: int, *, oversized: Literal["error", "alone"] = "error",
    max_items: int | None = None,
) -> list[np.ndarray]:
    """Split ``order`` (indices sorted by ascending ``sizes``) into consecutive batches whose
    count times largest size stays within ``max_tokens`` (and whose count within
    ``max_items``, if given): the one token batcher, used by training (``epoch_batches``,
    ``sorted_batches``) and by translation.

    oversized: what a single item larger than ``max_tokens`` does: ``error`` raises ValueError
    (training checks its pairs first), ``alone`` gets a batch of its own (translation, where
    every line must be translated).

    The loop runs once per batch; within it a vector test over a window finds the batch end.
    """
    ordered = np.asarray(sizes)[order]
    batches, start, n = [], 0, len(order)
    while start < n:
        if ordered[start] > max_tokens:
            if oversized == "error":
                raise ValueError(f"a pair of {ordered[start]} tokens does not fit in max_tokens={max_tokens}")
            batches.append(order[start : start + 1])
            start += 1
            continue
        window = min(n - start, max_tokens // int(ordered[start]), max_items or n)
        # Sizes ascend, so "count * size of the last one fits" is true then false: find the edge.
        fits = np.arange(1, window + 1) * ordered[start : start + window] <= max_tokens
        count = window if fits.all() else int(np.argmin(fits))
        batches.append(order[start : start + count])
        start += count
    return batches


def epoch_batches(corpus: TokenizedCorpus, max_tokens: int, seed: int, epoch: int,
                  rows: np.ndarray | None = None) -> list[np.ndarray]:
    """The batches of ``epoch`` (arrays of pair indices) in their shuffled order.

    Pairs are sorted by padded size, then source length, then target length, with random ties,
    so equal-length pairs are batched together but not always the same ones. ``rows``: the
    pairs of this epoch, repeats allowed (``epoch_rows``; default: each pair once).
    """
    rng = np.random.default_rng([seed, epoch])
    if rows is None:
        ties = rng.permutation(len(corpus))
        order = np.lexsort((ties, corpus.tgt_lens, corpus.src_lens, corpus.sizes))
    else:
        ties = rng.permutation(len(rows))
        order = rows[np.lexsort((ties, corpus.tgt_lens[rows], corpus.src_lens[rows], corpus.sizes[rows]))]
    batches = pack(corpus.sizes, order, max_tokens)
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_rows(groups: list[tuple[str, int, int, float]], temperature: float, seed: int,
               epoch: int) -> np.ndarray | None:
    """The pairs of one epoch, drawn over corpora and directions. ``groups`` are the corpora
    as ``(direction, start, end, weight)``: rows ``[start, end)``, counted ``weight`` times
    (2: each pair twice; 0.5: half of them, drawn anew each epoch). Directions then share the
    epoch by temperature (fairseq's ``p_i ∝ (n_i / N) ** (1 / T)`` over the weighted sizes),
    each direction's share split among its corpora by weighted size. The epoch has as many
    pairs as the weighted corpus; within a corpus every pair comes once before any comes twice
    (whole copies, then a draw without replacement). A pure function of ``(seed, epoch)``.
    None (each pair once) when every weight is 1 and there is one direction or ``T`` is 1."""
    groups = [group for group in groups if group[2] > group[1]]
    directions = list(dict.fromkeys(direction for direction, *_ in groups))
    if all(weight == 1.0 for *_, weight in groups) and (len(directions) < 2 or temperature == 1.0):
        return None
    sizes = np.array([(end - start) * weight for _, start, end, weight in groups], dtype=np.float64)
    of = np.array([directions.index(direction) for direction, *_ in groups])
    direction_sizes = np.bincount(of, weights=sizes, minlength=len(directions))
    shares = (direction_sizes / direction_sizes.sum()) ** (1.0 / temperature)
    direction_counts = shares / shares.sum() * sizes.sum()
    counts = np.rint(direction_counts[of] * sizes / direction_sizes[of]).astype(np.int64)
    rng = np.random.default_rng([seed, epoch, 1])  # a stream of its own: epoch_batches draws [seed, epoch]
    drawn = []
    for (_, start, end, _), count in zip(groups, counts, strict=True):
        full, rest = divmod(int(count), end - start)
        drawn += [np.tile(np.arange(start, end, dtype=np.int64), full),
                  start + rng.choice(end - start, rest, replace=False)]
    return np.concatenate(drawn)


def sorted_batches(corpus: TokenizedCorpus, max_tokens: int) -> list[np.ndarray]:
    """Deterministic batches in length order (validation)."""
    order = np.lexsort((np.arange(len(corpus)), corpus.tgt_lens, corpus.src_lens, corpus.sizes))
    return pack(corpus.sizes, order, max_tokens)


def padding_ratio(corpus: TokenizedCorpus, batches: list[np.ndarray]) -> float:
    """Share of padding among all positions of ``src`` and ``tgt_out`` over ``batches``."""
    real = padded = 0
    for indices in batches:
        src, tgt = corpus.src_lens[indices] + 1, corpus.tgt_lens[indices] + 1
        real += int(src.sum() + tgt.sum())
        padded += len(indices) * int(src.max() + tgt.max())
    return 1.0 - real / padded if padded else 0.0
