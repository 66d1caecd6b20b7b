"""Search over a trained Transformer: beam search, greedy search and sampling. Tensors only.

Three layers, as in fairseq2: ``beam_step`` is a pure function (candidate scores in, chosen
candidates out); ``beam_search`` / ``sample`` are the loops that run the model incrementally
(the encoder once, then one ``decode_step`` per output token, the key/value cache reordered
with ``DecoderState``); ``mtkit.translate`` turns text into ids and back.

Conventions. Source rows are ids followed by EOS, right-padded with PAD (as in training);
every row holds at least one token. Output tokens exclude BOS and EOS. PAD and BOS are never
generated; nor is UNK under ``allow_unk=False`` (except inside a forced prefix), so that an
output never shows SentencePiece's `` ⁇ `` (Marian's default; ``decode.allow_unk``). A
hypothesis of ``n`` tokens is scored by its log-probability (the EOS included) divided by a
length penalty of ``n + 1``: GNMT's ``((5 + n + 1) / 6) ** lenpen`` (``lenpen_form`` "gnmt",
this module's default) or ``(n + 1) ** lenpen`` ("length", as fairseq and CTranslate2).

Beam search, per sentence and step: the ``2 * beam`` best extensions of the live beams are
taken; those that end in EOS *and* rank among the ``beam`` best finish (they enter an n-best
pool of size ``nbest``); the ``beam`` best that do not end in EOS stay live, so the beam is
always full. A sentence is done when its pool is full and no live beam can still beat the
pool's worst hypothesis: log-probabilities only fall as a hypothesis grows, so the best a
live beam with log-probability ``s <= 0`` can reach is ``s / lp(max_len + 1)``. Under the
"length" form with ``lenpen > 0`` that bound holds nearly every sentence to its maximum length,
so there a sentence is done once ``beam`` hypotheses have finished (CTranslate2's and fairseq's
rule). With one beam the first EOS ends the sentence, which is greedy search. Done sentences
leave the batch (their rows are selected out of the cache), so they cost nothing afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from mtkit.models import TranslationModel
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

NEG_INF = float("-inf")
LengthPenaltyForm = Literal["gnmt", "length"]


@dataclass
class Hypothesis:
    """One output: ``tokens`` without BOS/EOS; ``score`` the length-penalised log-probability."""

    tokens: list[int]
    score: float


@overload
def length_penalty(length: Tensor, alpha: float, form: LengthPenaltyForm = "gnmt") -> Tensor: ...
@overload
def length_penalty(length: float, alpha: float, form: LengthPenaltyForm = "gnmt") -> float: ...
def length_penalty(length: Tensor | float, alpha: float, form: LengthPenaltyForm = "gnmt") -> Tensor | float:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` or (``form="length"``) plain
    ``length ** alpha``; ``length`` counts the EOS. Both grow with ``length`` (the early stop
    of beam search relies on it)."""
    if form == "length":
        return length**alpha
    return ((5.0 + length) / 6.0) ** alpha


def _check_lenpen(lenpen: float) -> None:
    """A negative alpha would reward length without bound, and break the early stop of beam
    search (which assumes that a longer hypothesis never scores better); the config forbids it."""
    if lenpen < 0:
        raise ValueError(f"lenpen must be >= 0, got {lenpen}")


def max_lengths(src: Tensor, max_len_a: float, max_len_b: int, max_positions: int | Tensor,
                floor: Tensor | None = None) -> Tensor:
    """``(B,)`` longest output (tokens, without EOS) per sentence: ``floor(a * src_len + b)``
    with ``src_len`` the source's non-padding tokens (its EOS included), at
    least ``floor`` (min length, prefix), at most what the model's positions allow (BOS and
    every output token are fed to the decoder): ``max_positions`` per model or per row."""
    src_len = (src != PAD_ID).sum(dim=1)
    limit = (max_len_a * src_len.double() + max_len_b).floor().long()
    if floor is not None:
        limit = torch.maximum(limit, floor)
    return torch.minimum(limit, torch.as_tensor(max_positions) - 1).clamp(min=0)


# --------------------------------------------------------------------------- the pure step


def beam_step(scores: Tensor, log_probs: Tensor, beam: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Choose the next beams of N sentences.

    scores: ``(N, K)`` log-probabilities of the live beams (-inf for empty slots).
    log_probs: ``(N, K, V)`` next-token log-probabilities (-inf for forbidden tokens).
    Returns, each ``(N, C)`` with ``C = min(2 * beam, K * V)`` candidates, best first:
    candidate scores, the beam each extends, its token, and ``finishing``: True for an EOS
    candidate that ranks among the ``beam`` best (a finished hypothesis).
    """
    n, k, vocab = log_probs.shape
    candidates = log_probs.add(scores.unsqueeze(2)).view(n, k * vocab)
    values, flat = candidates.topk(min(2 * beam, k * vocab), dim=1)
    origin, token = flat // vocab, flat % vocab
    rank = torch.arange(values.shape[1], device=values.device)
    finishing = (token == EOS_ID) & (rank < beam) & (values > NEG_INF)
    return values, origin, token, finishing


def next_beams(values: Tensor, origin: Tensor, token: Tensor, beam: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``beam`` best candidates of ``beam_step`` that do not end in EOS, each ``(N, beam)``:
    scores (-inf where fewer are left), the beam each extends, and its token."""
    if values.shape[1] < beam:  # a vocabulary smaller than the beam: pad with dead candidates
        pad = beam - values.shape[1]
        values = F.pad(values, (0, pad), value=NEG_INF)
        origin = F.pad(origin, (0, pad), value=0)
        token = F.pad(token, (0, pad), value=EOS_ID)
    is_eos = token == EOS_ID
    # Non-EOS candidates first, each group in rank order.
    rank = torch.arange(values.shape[1], device=values.device)
    pick = (is_eos.long() * values.shape[1] + rank).topk(beam, dim=1, largest=False, sorted=True).indices
    chosen = values.gather(1, pick).masked_fill(is_eos.gather(1, pick), NEG_INF)
    return chosen, origin.gather(1, pick), token.gather(1, pick)


# --------------------------------------------------------------------------- constraints


@dataclass
class _Constraints:
    """Per-sentence limits of the live batch (rows select with the sentences)."""

    max_len: Tensor  # (N,) output tokens before EOS is forced
    prefix: Tensor  # (N, P) forced leading tokens, -1 after each prefix
    prefix_len: Tensor  # (N,)
    forced: int = 0  # leading prefix tokens that score 0 (see beam_search)

    def select(self, keep: Tensor) -> _Constraints:
        return _Constraints(self.max_len[keep], self.prefix[keep], self.prefix_len[keep], self.forced)


def _make_constraints(model: TranslationModel, src: Tensor, max_len_a: float, max_len_b: int, min_len: int,
                      prefix: list[list[int]] | None, forced: int = 0) -> _Constraints:
    batch = src.shape[0]
    if prefix is None:
        prefix = [[] for _ in range(batch)]
    if len(prefix) != batch:
        raise ValueError(f"{len(prefix)} prefixes for {batch} sentences")
    width = max((len(p) for p in prefix), default=0)
    forced_ids = torch.full((batch, max(width, 1)), -1, dtype=torch.long)
    for row, ids in enumerate(prefix):
        forced_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    prefix_len = torch.tensor([len(p) for p in prefix], dtype=torch.long)
    limit = max_lengths(src.cpu(), max_len_a, max_len_b, model.positions_left(src).cpu(),
                        floor=torch.clamp(prefix_len, min=min_len))
    device = src.device
    if forced and any(len(p) < forced for p in prefix):
        raise ValueError(f"forced={forced}: every prefix must hold the forced tokens")
    return _Constraints(limit.to(device), forced_ids.to(device), prefix_len.to(device), forced)


def _constrain(log_probs: Tensor, step: int, min_len: int, cons: _Constraints, rows_per_sentence: int,
               allow_unk: bool = True) -> Tensor:
    """Apply the search rules to ``(N * R, V)`` log-probabilities at output position ``step``:
    PAD and BOS never; UNK never unless ``allow_unk``; EOS not before ``min_len``; the prefix
    token while inside the prefix (even UNK: a prefix is the caller's text); only EOS at a
    sentence's maximum length."""
    log_probs[:, PAD_ID] = NEG_INF
    log_probs[:, BOS_ID] = NEG_INF
    in_prefix = step < cons.prefix_len
    at_max = step >= cons.max_len
    if not bool((in_prefix | at_max).any()):
        if step < min_len:
            log_probs[:, EOS_ID] = NEG_INF
        if not allow_unk:
            log_probs[:, UNK_ID] = NEG_INF
        return log_probs
    original_eos = log_probs[:, EOS_ID].clone()
    if step < min_len:
        log_probs[:, EOS_ID] = NEG_INF
    col = min(step, cons.prefix.shape[1] - 1)
    force = torch.where(at_max, EOS_ID, torch.where(in_prefix, cons.prefix[:, col], -1))
    force = force.repeat_interleave(rows_per_sentence)
    forced_rows = force >= 0
    target = force.clamp(min=0).unsqueeze(1)
    kept = log_probs.gather(1, target)
    # EOS forced at the maximum length keeps its real log-probability even before min_len.
    kept = torch.where(target == EOS_ID, original_eos.unsqueeze(1), kept)
    if step < cons.forced:  # a forced token is no choice of the model's: it costs nothing
        kept = torch.where(in_prefix.repeat_interleave(rows_per_sentence).unsqueeze(1), 0.0, kept)
    only = torch.full_like(log_probs, NEG_INF).scatter_(1, target, kept)
    if not allow_unk:
        log_probs[:, UNK_ID] = NEG_INF
    return torch.where(forced_rows.unsqueeze(1), only, log_probs)


# --------------------------------------------------------------------------- beam search


@dataclass
class _Pool:
    """The n-best finished hypotheses of each live sentence, best first: ``scores`` ``(N, P)``
    (length-penalised; -inf in empty slots), ``tokens`` ``(N, P, L)`` PAD-filled, ``lens`` ``(N, P)``."""

    scores: Tensor
    tokens: Tensor
    lens: Tensor

    @classmethod
    def empty(cls, sentences: int, size: int, width: int, device: torch.device) -> _Pool:
        return cls(
            torch.full((sentences, size), NEG_INF, device=device),
            torch.full((sentences, size, width), PAD_ID, dtype=torch.long, device=device),
            torch.zeros((sentences, size), dtype=torch.long, device=device),
        )

    def add(self, scores: Tensor, tokens: Tensor) -> None:
        """Merge candidates ``(N, C)`` (-inf: not finished) with tokens ``(N, C, t)``, keeping the best."""
        n, size, width = self.tokens.shape
        length = tokens.shape[2]
        self.scores, top = torch.cat([self.scores, scores], dim=1).topk(size, dim=1)
        tokens = F.pad(tokens, (0, width - length), value=PAD_ID)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)[torch.arange(n, device=top.device)[:, None], top]
        lens = torch.cat([self.lens, torch.full_like(scores, length, dtype=torch.long)], dim=1)
        self.lens = lens.gather(1, top)

    def select(self, keep: Tensor) -> _Pool:
        return _Pool(self.scores[keep], self.tokens[keep], self.lens[keep])

    def take(self, rows: Tensor) -> list[list[Hypothesis]]:
        """The hypotheses of sentences ``rows``, as Python lists."""
        return [
            [Hypothesis(toks[:length], score) for score, toks, length in zip(*row, strict=True) if score > NEG_INF]
            for row in zip(self.scores[rows].tolist(), self.tokens[rows].tolist(), self.lens[rows].tolist(),
                           strict=True)
        ]


@torch.inference_mode()
def beam_search(
    model: TranslationModel,
    src: Tensor,
    *,
    beam: int = 5,
    lenpen: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 1,
    nbest: int = 1,
    prefix: list[list[int]] | None = None,
    allow_unk: bool = True,
    lenpen_form: LengthPenaltyForm = "gnmt",
    forced: int = 0,
) -> list[list[Hypothesis]]:
    """Beam search for every row of ``src`` ``(B, S)`` at once (see the module docstring).

    prefix: per sentence, target ids the output must start with (scored like any others).
    forced: the first ``forced`` prefix tokens of every sentence score 0 instead (a language
    token forced as transformers' ``forced_bos_token_id`` forces it).
    allow_unk: whether UNK may be generated (``mtkit.translate`` passes ``decode.allow_unk``).
    Returns per sentence its ``nbest`` best hypotheses, best first.
    """
    if beam < 1 or not 1 <= nbest <= beam:
        raise ValueError(f"need 1 <= nbest ({nbest}) <= beam ({beam})")
    _check_lenpen(lenpen)
    batch, device, k = src.shape[0], src.device, beam
    cons = _make_constraints(model, src, max_len_a, max_len_b, min_len, prefix, forced)
    # The best score a live beam may still reach needs lp at the longest possible length.
    best_lp = length_penalty(cons.max_len.double() + 1, lenpen, lenpen_form)
    # Under length ** lenpen that bound is so loose that nearly every sentence would search to
    # its maximum length: a sentence ends instead once ``beam`` hypotheses have finished, as in
    # CTranslate2 and fairseq.
    count_finished = lenpen_form == "length" and lenpen != 0
    finished_count = torch.zeros(batch, dtype=torch.long, device=device)
    state = model.encode(src)
    # Live beams per sentence: one (its BOS) for the first step, so that it runs on one row per
    # sentence instead of ``k`` equal ones; then ``k``.
    width = 1

    sentence = torch.arange(batch, device=device)  # original index of each live sentence
    scores = torch.zeros((batch, 1), device=device)
    history = torch.empty((batch, 0), dtype=torch.long, device=device)
    last = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=device)
    pool = _Pool.empty(batch, nbest, int(cons.max_len.max()) + 1, device)
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]

    step = 0
    while sentence.numel():
        n = sentence.numel()
        logits = model.decode_step(last, state)
        log_probs = _constrain(torch.log_softmax(logits.float(), dim=-1), step, min_len, cons, width, allow_unk)
        values, origin, token, finishing = beam_step(scores, log_probs.view(n, width, -1), beam)

        finished_count += finishing.sum(dim=1)
        if bool(finishing.any()):
            # Candidates that end here have ``step`` tokens (their beam's history).
            rows = (torch.arange(n, device=device) * width).unsqueeze(1) + origin
            ended = history[rows.view(-1)].view(n, rows.shape[1], step)
            pool.add(torch.where(finishing, values / length_penalty(step + 1.0, lenpen, lenpen_form), NEG_INF), ended)

        scores, origin, token = next_beams(values, origin, token, beam)
        rows = ((torch.arange(n, device=device) * width).unsqueeze(1) + origin).view(-1)
        history = torch.cat([history[rows], token.view(-1, 1)], dim=1)
        if width == 1 and k > 1:
            state = state.repeat(k)  # every new beam extends the sentence's one row
        else:
            state.reorder_self(rows)
        width = k
        last = token.view(-1, 1)
        step += 1

        best_live = scores.max(dim=1).values
        worst_kept = pool.scores[:, -1]
        if k == 1:  # greedy: the first EOS ends the sentence
            done = worst_kept > NEG_INF
        elif count_finished:
            done = finished_count >= k
        else:
            done = (worst_kept > NEG_INF) & (worst_kept.double() >= best_live.double() / best_lp)
        done |= best_live == NEG_INF
        if bool(done.any()):
            finished = done.nonzero().view(-1)
            for index, hyps in zip(sentence[finished].tolist(), pool.take(finished), strict=True):
                results[index] = hyps
            keep = (~done).nonzero().view(-1)
            sentence, scores, best_lp = sentence[keep], scores[keep], best_lp[keep]
            finished_count = finished_count[keep]
            cons, pool = cons.select(keep), pool.select(keep)
            beam_rows = ((keep * k).unsqueeze(1) + torch.arange(k, device=device)).view(-1)
            history, last = history[beam_rows], last[beam_rows]
            if keep.numel():
                state = state.select(beam_rows)
    return results


def greedy_search(
    model: TranslationModel,
    src: Tensor,
    *,
    lenpen: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 1,
    prefix: list[list[int]] | None = None,
    allow_unk: bool = True,
    lenpen_form: LengthPenaltyForm = "gnmt",
    forced: int = 0,
) -> list[list[Hypothesis]]:
    """The most likely token at each step: beam search with one beam (``lenpen`` only
    scales the reported score)."""
    return beam_search(model, src, beam=1, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b,
                       min_len=min_len, nbest=1, prefix=prefix, allow_unk=allow_unk, lenpen_form=lenpen_form,
                       forced=forced)


# --------------------------------------------------------------------------- sampling


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``(R, V)`` logits reshaped for sampling: divided by ``temperature``, then everything
    outside the ``top_k`` most likely tokens and outside the smallest set whose probability
    reaches ``top_p`` set to -inf (the most likely token always survives)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already reach top_p.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)
    return logits


@torch.inference_mode()
def sample(
    model: TranslationModel,
    src: Tensor,
    *,
    nbest: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lenpen: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 1,
    prefix: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
    allow_unk: bool = True,
    lenpen_form: LengthPenaltyForm = "gnmt",
    forced: int = 0,
) -> list[list[Hypothesis]]:
    """``nbest`` independent samples per sentence, best score first. Scores are the model's
    log-probabilities (before temperature and filtering), length-penalised as in beam search."""
    _check_lenpen(lenpen)
    batch, device, k = src.shape[0], src.device, nbest
    cons = _make_constraints(model, src, max_len_a, max_len_b, min_len, prefix, forced)
    rows_index = torch.arange(batch, device=device).repeat_interleave(k)
    state = model.encode(src).select(rows_index)
    cons = cons.select(rows_index)  # one row per sample from here on
    owner = rows_index.clone()  # sentence of each live row
    scores = torch.zeros(batch * k, device=device)
    history = torch.empty((batch * k, 0), dtype=torch.long, device=device)
    last = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]

    step = 0
    while owner.numel():
        logits = model.decode_step(last, state).float()
        log_probs = _constrain(torch.log_softmax(logits, dim=-1), step, min_len, cons, 1, allow_unk)
        allowed = filter_logits(logits.masked_fill(log_probs == NEG_INF, NEG_INF), temperature, top_k, top_p)
        token = torch.multinomial(allowed.softmax(dim=-1), 1, generator=generator)
        scores = scores + log_probs.gather(1, token).view(-1)
        ended = token.view(-1) == EOS_ID
        history = torch.cat([history, token], dim=1)
        step += 1
        if bool(ended.any()):
            done = ended.nonzero().view(-1)
            final = scores[done] / length_penalty(float(step), lenpen, lenpen_form)
            for sent, score, toks in zip(owner[done].tolist(), final.tolist(), history[done, :-1].tolist(),
                                         strict=True):
                results[sent].append(Hypothesis(toks, score))
            keep = (~ended).nonzero().view(-1)
            owner, scores, history, cons = owner[keep], scores[keep], history[keep], cons.select(keep)
            token = token[keep]
            if keep.numel():
                state = state.select(keep)
        last = token
    for hyps in results:
        hyps.sort(key=lambda h: -h.score)
    return results
