"""Parallel corpora: read, normalise, filter, encode, and store them as Arrow for training.

``prepare(config)`` turns the corpora of ``config.data`` into
``{experiment.dir}/data/{train,valid,test}`` (``datasets.Dataset.save_to_disk`` layout) with
columns ``src``, ``tgt`` (cleaned text), ``src_ids``, ``tgt_ids`` (int32 subword ids, no
BOS/EOS) and ``src_len``, ``tgt_len`` (int32), plus ``report.json`` / ``report.txt``.

Everything streams in chunks of ``data.chunk_size`` pairs: memory is bounded by the chunk
and the de-duplication set (a 64-bit hash per kept pair, about 60 bytes in a Python set),
never by the corpus text. The whole ``data/`` directory is written under a temporary name
and renamed at the end, so a failed or killed run leaves no complete-looking output.

Whitespace normalisation (applied to every side of every split, and to tokenizer training
text): control characters other than whitespace are removed (C0, DEL, C1, and the byte-order
mark U+FEFF); every run of whitespace (spaces, tabs, Unicode spaces such as U+00A0 and U+3000,
line and paragraph separators) becomes one ASCII space; the ends are stripped. A tab inside a
sentence is therefore a space: tabs only ever separate columns (TSV).

Training pairs are filtered; each dropped pair is counted under the first check it fails, in
the order of ``DROP_REASONS``. Valid and test pairs are kept line for line (normalised only;
an empty line stays, so references stay aligned), except a pair that is not UTF-8 under
``data.invalid_utf8=skip``, which is dropped and counted in every split.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import resource
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from mtkit.config import Config, CorpusConfig, DataConfig, save_config
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, read_lines
from mtkit.tokenizer import Side, Tokenizers, tokenizer_dir, train_tokenizers

if TYPE_CHECKING:  # datasets takes a second to import; the readers and normalise do not need it
    import datasets

SPLITS = ("train", "valid", "test")
DROP_REASONS = ("invalid_utf8", "empty", "duplicate", "eval_overlap", "too_short", "too_long", "ratio")
"""Why a pair was dropped, in the order the checks run."""

SCHEMA = pa.schema(
    [
        ("src", pa.string()),
        ("tgt", pa.string()),
        ("src_ids", pa.list_(pa.int32())),
        ("tgt_ids", pa.list_(pa.int32())),
        ("src_len", pa.int32()),
        ("tgt_len", pa.int32()),
    ]
)

Chunk = tuple[list[Any], list[Any]]
"""Source and target sentences of up to ``chunk_size`` pairs; None marks a line that is not
UTF-8 (under ``invalid_utf8=skip``)."""


def data_dir(exp_dir: Path) -> Path:
    return Path(exp_dir) / "data"


# --------------------------------------------------------------------------- normalisation

_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
"""Control characters that str.split() does not already treat as whitespace."""


def normalize(texts: list[str]) -> list[str]:
    """Remove control characters, collapse whitespace runs to one space, strip (see module doc)."""
    # One regex scan of the joined chunk is far cheaper than one per line, and control
    # characters are rare, so the per-line substitution almost never runs. (Finding the few
    # lines that need whitespace work the same way was measured slower than split/join.)
    if _CONTROL.search("".join(texts)):
        texts = [_CONTROL.sub("", text) for text in texts]
    return [" ".join(text.split()) for text in texts]


# --------------------------------------------------------------------------- readers


def read_corpus(corpus: CorpusConfig, invalid_utf8: str = "error", chunk_size: int = 10_000) -> Iterator[Chunk]:
    """Raw (not yet normalised) pairs of one corpus, ``chunk_size`` at a time, at most
    ``corpus.limit`` in all. Bad input raises MtkitError naming the file and line."""
    chunks = _READERS[corpus.format](corpus, invalid_utf8, chunk_size)
    if corpus.limit is None:
        yield from chunks
        return
    left = corpus.limit
    for src, tgt in chunks:
        if len(src) >= left:
            yield src[:left], tgt[:left]
            return
        left -= len(src)
        yield src, tgt


def _read_text(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.src is not None and corpus.tgt is not None
    src_lines = read_lines(corpus.src, invalid_utf8)
    tgt_lines = read_lines(corpus.tgt, invalid_utf8)
    done = 0
    while True:
        src = list(islice(src_lines, chunk_size))
        tgt = list(islice(tgt_lines, chunk_size))
        if len(src) != len(tgt):
            src_total = done + len(src) + sum(1 for _ in src_lines)
            tgt_total = done + len(tgt) + sum(1 for _ in tgt_lines)
            raise MtkitError(
                f"{corpus.src} has {src_total} lines but {corpus.tgt} has {tgt_total}; "
                "a parallel corpus needs the same number of lines on both sides"
            )
        if not src:
            return
        done += len(src)
        yield src, tgt


def _read_tsv(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.path is not None
    path = corpus.path
    lines = read_lines(path, invalid_utf8)
    number = 0
    names: list[str] = []
    if corpus.header:
        first = next(lines, None)
        number = 1
        if first is None:
            raise MtkitError(f"{path}:1: header line missing or not UTF-8")
        names = first.split("\t")
    columns = [_tsv_column(path, spec, names, corpus.header) for spec in (corpus.src_field, corpus.tgt_field)]
    (src_col, src_name), (tgt_col, tgt_name) = columns
    width = max(src_col, tgt_col) + 1
    while True:
        block = list(islice(lines, chunk_size))
        if not block:
            return
        src: list[str | None] = []
        tgt: list[str | None] = []
        for line in block:
            number += 1
            if line is None:
                src.append(None)
                tgt.append(None)
                continue
            cells = line.split("\t")
            if len(cells) < width:
                name = src_name if len(cells) <= src_col else tgt_name
                raise MtkitError(f"{path}:{number}: {len(cells)} column(s), column {name} is missing")
            src.append(cells[src_col])
            tgt.append(cells[tgt_col])
        yield src, tgt


def _tsv_column(path: Path, spec: str, names: list[str], header: bool) -> tuple[int, str]:
    """(0-based index, description) of a TSV column given by index or header name."""
    if spec.isascii() and spec.isdigit():
        return int(spec), spec
    if not header:
        raise MtkitError(
            f"{path}: column '{spec}' is not a 0-based index and the corpus has no header "
            "(set header: true or give a column number)"
        )
    if spec not in names:
        raise MtkitError(f"{path}:1: no column named '{spec}' in the header ({', '.join(names)})")
    return names.index(spec), f"'{spec}'"


def _read_jsonl(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.path is not None
    path = corpus.path
    src_path, tgt_path = corpus.src_field.split("."), corpus.tgt_field.split(".")
    lines = read_lines(path, invalid_utf8)
    number = 0
    while True:
        block = list(islice(lines, chunk_size))
        if not block:
            return
        src: list[str | None] = []
        tgt: list[str | None] = []
        for line in block:
            number += 1
            if line is None:
                src.append(None)
                tgt.append(None)
                continue
            if not line.strip():  # a blank line holds no record
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MtkitError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            src.append(_field(record, src_path, f"{path}:{number}"))
            tgt.append(_field(record, tgt_path, f"{path}:{number}"))
        yield src, tgt


def _field(record: Any, keys: list[str], where: str) -> str:
    """``record["a"]["b"]`` for the dotted field ``a.b``; MtkitError naming ``where`` if absent."""
    value = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise MtkitError(f"{where}: no field '{'.'.join(keys)}'")
        value = value[key]
    if not isinstance(value, str):
        raise MtkitError(f"{where}: field '{'.'.join(keys)}' is {type(value).__name__}, expected a string")
    return value


def _read_hub(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    import datasets

    name = f"hub dataset {corpus.name}" + (f"/{corpus.subset}" if corpus.subset else "") + f" [{corpus.split}]"
    src_path, tgt_path = corpus.src_field.split("."), corpus.tgt_field.split(".")
    # The hub client raises many exception types (network, missing dataset or split, script
    # errors); for the user each is one line about this corpus.
    try:
        records = iter(datasets.load_dataset(corpus.name, corpus.subset, split=corpus.split, streaming=True))
    except Exception as err:
        raise MtkitError(f"{name}: cannot load: {_one_line(err)}") from None
    number = 0
    while True:
        try:
            block = list(islice(records, chunk_size))
        except Exception as err:
            raise MtkitError(f"{name}: read failed after record {number}: {_one_line(err)}") from None
        if not block:
            return
        src, tgt = [], []
        for record in block:
            number += 1
            src.append(_field(record, src_path, f"{name} record {number}"))
            tgt.append(_field(record, tgt_path, f"{name} record {number}"))
        yield src, tgt


_READERS: dict[str, Callable[[CorpusConfig, str, int], Iterator[Chunk]]] = {
    "text": _read_text,
    "tsv": _read_tsv,
    "jsonl": _read_jsonl,
    "hub": _read_hub,
}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)


def training_text(data: DataConfig, sides: tuple[Side, ...]) -> Iterator[str]:
    """Normalised, non-empty sentences of ``sides`` of the training corpora, for tokenizer
    training: the same readers and normalisation as ``prepare``."""
    if not data.train:
        raise MtkitError("data.train: no training corpora configured")
    for corpus in data.train:
        for raw_src, raw_tgt in read_corpus(corpus, data.invalid_utf8, data.chunk_size):
            src, tgt = _without_invalid(raw_src, raw_tgt)
            for side, texts in (("src", src), ("tgt", tgt)):
                if side in sides:
                    yield from filter(None, normalize(texts))


def train_tokenizer(config: Config) -> Tokenizers:
    """Train the experiment's tokenizer on ``data.train`` (the readers and normalisation of
    ``prepare``) into ``{experiment.dir}/tokenizer/``, and save the resolved config there."""
    tokenizers = train_tokenizers(
        config.tokenizer,
        tokenizer_dir(config),
        lambda sides: training_text(config.data, sides),
        seed=config.experiment.seed,
    )
    save_config(config, config.experiment.dir / "config.yaml")
    return tokenizers


def _without_invalid(src: list[str | None], tgt: list[str | None]) -> tuple[list[str], list[str]]:
    """The pairs of a chunk whose both sides are UTF-8 (see ``invalid_utf8=skip``)."""
    if None not in src and None not in tgt:
        return src, tgt  # type: ignore[return-value]
    pairs = [(s, t) for s, t in zip(src, tgt, strict=True) if s is not None and t is not None]
    return [s for s, _ in pairs], [t for _, t in pairs]


# --------------------------------------------------------------------------- the report


@dataclass
class SplitReport:
    """Counts for one split: every pair read is either kept or dropped for one reason."""

    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    src_tokens: int = 0
    tgt_tokens: int = 0


@dataclass
class PrepareReport:
    tokenizer_fingerprint: str
    config_hash: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall-clock time of the whole prepare (after imports)."""
    cpu_seconds: float = 0.0
    """CPU time over the same span, of this process and its encoding workers."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_text(self) -> str:
        """A table a person can read: one row per split, one column per count."""
        header = ["split", "read", "kept", *DROP_REASONS, "src_tokens", "tgt_tokens"]
        rows = [header]
        for name, s in self.splits.items():
            rows.append([name, s.read, s.kept, *(s.dropped[r] for r in DROP_REASONS), s.src_tokens, s.tgt_tokens])
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.append(f"tokenizer_fingerprint {self.tokenizer_fingerprint}")
        lines.append(f"seconds {self.seconds:.1f} (cpu {self.cpu_seconds:.1f})")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- prepare


def prepare(config: Config) -> PrepareReport:
    """Read, clean, filter, de-duplicate and encode the corpora of ``config.data`` into
    ``{experiment.dir}/data`` (replaced atomically) and return the report."""
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    data = config.data
    if not data.train:
        raise MtkitError("data.train: no training corpora configured")
    tokenizers = Tokenizers.load(tokenizer_dir(config))
    exp_dir = config.experiment.dir
    out = data_dir(exp_dir)
    for stale in exp_dir.glob(f".{out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    report = PrepareReport(tokenizers.fingerprint(), config.section_hash("data", "tokenizer"))
    with atomic_dir(out) as tmp:
        # Valid and test first: training pairs whose source they contain may be removed.
        eval_sources: set[int] = set()
        splits = {"valid": [data.valid] if data.valid else [], "test": [data.test] if data.test else []}
        splits["train"] = data.train
        for split, corpora in splits.items():
            if not corpora:
                continue
            stats = _prepare_split(split, corpora, data, tokenizers, tmp, eval_sources)
            report.splits[split] = stats
            if stats.kept == 0:
                raise MtkitError(f"data.{split}: no pairs left ({_drop_summary(stats)})")
        report.seconds = time.perf_counter() - start
        report.cpu_seconds = _cpu_seconds() - start_cpu
        # Plain writes: inside the temporary directory, whose rename is the atomic step.
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.txt").write_text(report.to_text(), encoding="utf-8")
    save_config(config, exp_dir / "config.yaml")
    return report


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the encoding workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _drop_summary(stats: SplitReport) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in stats.dropped.items() if n)
    return f"read {stats.read}" + (f"; dropped {reasons}" if reasons else "")


def _prepare_split(
    split: str,
    corpora: list[CorpusConfig],
    data: DataConfig,
    tokenizers: Tokenizers,
    out: Path,
    eval_sources: set[int],
) -> SplitReport:
    stats = SplitReport()
    limits = _Limits(data.min_len, data.max_len, data.max_ratio) if split == "train" else None
    directory = out / split
    directory.mkdir()
    chunks = _clean_chunks(split, corpora, data, stats, eval_sources)
    with pa.OSFile(str(directory / _SHARD), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for encoded in _encode_all(chunks, tokenizers, limits, data.num_proc):
            writer.write_batch(encoded.batch)
            stats.kept += encoded.batch.num_rows
            stats.src_tokens += encoded.src_tokens
            stats.tgt_tokens += encoded.tgt_tokens
            for reason in ("too_short", "too_long", "ratio"):
                stats.dropped[reason] += getattr(encoded, reason)
    _write_dataset_state(directory)
    return stats


def _clean_chunks(
    split: str, corpora: list[CorpusConfig], data: DataConfig, stats: SplitReport, eval_sources: set[int]
) -> Iterator[tuple[list[str], list[str]]]:
    """Normalised pairs, chunk by chunk; for training, without empty, duplicate and (if asked)
    valid/test pairs. Counts what it reads and drops in ``stats``; for valid/test, adds the
    hashes of the sources to ``eval_sources``."""
    train = split == "train"
    # 64-bit hashes of the kept pairs, not the pairs: ~60 bytes a pair in a Python set.
    # Python's str hash is SipHash, randomised per process but fixed within this run.
    seen: set[int] = set()
    for corpus in corpora:
        for raw_src, raw_tgt in read_corpus(corpus, data.invalid_utf8, data.chunk_size):
            stats.read += len(raw_src)
            valid_src, valid_tgt = _without_invalid(raw_src, raw_tgt)
            stats.dropped["invalid_utf8"] += len(raw_src) - len(valid_src)
            src, tgt = normalize(valid_src), normalize(valid_tgt)
            if train:
                src, tgt = _clean(src, tgt, data, stats, seen, eval_sources)
            else:
                eval_sources.update(map(hash, src))
            if src:
                yield src, tgt


def _clean(
    src: list[str], tgt: list[str], data: DataConfig, stats: SplitReport, seen: set[int], eval_sources: set[int]
) -> tuple[list[str], list[str]]:
    """Training pairs that are non-empty, not seen before and not in valid/test."""
    kept_src, kept_tgt = [], []
    empty = duplicate = overlap = 0
    dedup, check_overlap = data.dedup, data.remove_eval_overlap and bool(eval_sources)
    for s, t in zip(src, tgt, strict=True):
        if not s or not t:
            empty += 1
            continue
        if dedup:
            key = hash((s, t))
            if key in seen:
                duplicate += 1
                continue
            seen.add(key)
        if check_overlap and hash(s) in eval_sources:
            overlap += 1
            continue
        kept_src.append(s)
        kept_tgt.append(t)
    stats.dropped["empty"] += empty
    stats.dropped["duplicate"] += duplicate
    stats.dropped["eval_overlap"] += overlap
    return kept_src, kept_tgt


@dataclass(frozen=True)
class _Limits:
    """Token-length filters of training pairs (see DataConfig)."""

    min_len: int
    max_len: int
    max_ratio: float


class _Encoded(NamedTuple):
    batch: pa.RecordBatch
    too_short: int
    too_long: int
    ratio: int
    src_tokens: int
    tgt_tokens: int


def _encode(src: list[str], tgt: list[str], tokenizers: Tokenizers, limits: _Limits | None) -> _Encoded:
    """Encode a chunk and, given ``limits`` (training), drop pairs by token length."""
    src_ids = tokenizers.src.encode(src)
    tgt_ids = tokenizers.tgt.encode(tgt)
    src_len = np.fromiter(map(len, src_ids), dtype=np.int32, count=len(src_ids))
    tgt_len = np.fromiter(map(len, tgt_ids), dtype=np.int32, count=len(tgt_ids))
    too_short = too_long = ratio = 0
    if limits is not None:
        shorter, longer = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
        short_mask = shorter < limits.min_len
        long_mask = ~short_mask & (longer > limits.max_len)
        ratio_mask = ~short_mask & ~long_mask & (longer > limits.max_ratio * shorter)
        too_short, too_long, ratio = int(short_mask.sum()), int(long_mask.sum()), int(ratio_mask.sum())
        keep = ~(short_mask | long_mask | ratio_mask)
        if not keep.all():
            # Drops are few: picking from the lists beats Arrow's filter (whose compute
            # module alone takes 0.1 s to import).
            rows = np.flatnonzero(keep).tolist()
            src, tgt = [src[i] for i in rows], [tgt[i] for i in rows]
            src_ids, tgt_ids = [src_ids[i] for i in rows], [tgt_ids[i] for i in rows]
            src_len, tgt_len = src_len[keep], tgt_len[keep]
    columns = [
        _string_array(src),
        _string_array(tgt),
        _list_array(src_ids, src_len),
        _list_array(tgt_ids, tgt_len),
        _int32_array(src_len),
        _int32_array(tgt_len),
    ]
    batch = pa.record_batch(columns, schema=SCHEMA)
    return _Encoded(batch, too_short, too_long, ratio, int(src_len.sum()), int(tgt_len.sum()))


def _encode_all(
    chunks: Iterator[tuple[list[str], list[str]]], tokenizers: Tokenizers, limits: _Limits | None, num_proc: int
) -> Iterator[_Encoded]:
    """Encode chunks, in order: here, or with ``num_proc`` > 1 in that many worker processes
    while this one reads and cleans the next chunks. (SentencePiece's own ``num_threads`` was
    measured to gain nothing: building the Python id lists holds the GIL.) At most two chunks
    per worker are in flight, so memory stays bounded."""
    head = list(islice(chunks, 2))
    if num_proc == 1 or len(head) < 2:  # a one-chunk split is not worth starting workers for
        for src, tgt in chain(head, chunks):
            yield _encode(src, tgt, tokenizers, limits)
        return
    context = multiprocessing.get_context("spawn")  # no fork: pyarrow's threads may hold locks
    directory = tokenizers.src.path.parent
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_start_worker, initargs=(directory,)) as pool:
        pending: deque[Future[_Encoded]] = deque()
        for src, tgt in chain(head, chunks):
            pending.append(pool.submit(_encode_in_worker, src, tgt, limits))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_worker_tokenizers: Tokenizers | None = None
"""The tokenizers of an encoding worker process, loaded once by ``_start_worker``."""


def _start_worker(directory: Path) -> None:
    global _worker_tokenizers
    _worker_tokenizers = Tokenizers.load(directory)


def _encode_in_worker(src: list[str], tgt: list[str], limits: _Limits | None) -> _Encoded:
    assert _worker_tokenizers is not None
    return _encode(src, tgt, _worker_tokenizers, limits)


# Arrow arrays are assembled from numpy buffers rather than with pa.array, which is slower
# on nested lists and imports pandas on first use (most of a second).


def _int32_array(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _list_array(seqs: list[list[int]], lengths: np.ndarray) -> pa.Array:
    """``list<int32>`` array of ``seqs``, whose lengths are given."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return pa.Array.from_buffers(
        SCHEMA.field("src_ids").type, len(seqs), [None, pa.py_buffer(offsets)], children=[_int32_array(values)]
    )


def _string_array(texts: list[str]) -> pa.Array:
    """UTF-8 string array: all texts encoded at once, split where the joining newlines fall
    (normalised texts hold no newline)."""
    n = len(texts)
    data = "\n".join(texts).encode("utf-8")
    breaks = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    if len(breaks) != max(n - 1, 0):
        return pa.array(texts, pa.string())
    offsets = np.empty(n + 1, dtype=np.int32)
    offsets[0] = 0
    offsets[1:n] = breaks - np.arange(n - 1)
    offsets[n] = len(data) - len(breaks)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.replace(b"\n", b""))])


# A split is written in the layout of ``datasets.Dataset.save_to_disk`` (one Arrow stream
# shard, state.json, dataset_info.json), straight from pyarrow: going through datasets would
# copy every byte once more and its import alone costs a second. The features are left out of
# dataset_info.json, so datasets infers them from the Arrow schema. ``load_split`` (that is,
# ``datasets.load_from_disk``) reads it; the tests check that it does.
_SHARD = "data-00000-of-00001.arrow"


def _write_dataset_state(directory: Path) -> None:
    state = {
        "_data_files": [{"filename": _SHARD}],
        "_fingerprint": secrets.token_hex(8),  # datasets keys its cache on it: new data, new key
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {"citation": "", "description": "", "homepage": "", "license": ""}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- reading prepared data


def load_split(exp_dir: Path, split: str) -> datasets.Dataset:
    """A prepared split (memory-mapped). MtkitError if it was not prepared."""
    import datasets

    if split not in SPLITS:
        raise MtkitError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    directory = data_dir(exp_dir)
    _read_report(directory)
    if not (directory / split).is_dir():
        raise MtkitError(f"{directory}: no {split} split (data.{split} was not configured when preparing)")
    try:
        return datasets.load_from_disk(str(directory / split))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise MtkitError(
            f"{directory / split}: unreadable prepared data ({_one_line(err)}); rerun `mtkit prepare`"
        ) from None


def prepared_fingerprint(exp_dir: Path) -> str:
    """The fingerprint of the tokenizer the prepared data was encoded with."""
    return str(_read_report(data_dir(exp_dir))["tokenizer_fingerprint"])


def read_report(exp_dir: Path) -> dict[str, Any]:
    """The prepared data's report.json as a dict."""
    return _read_report(data_dir(exp_dir))


def _read_report(directory: Path) -> dict[str, Any]:
    path = directory / "report.json"
    if not path.is_file():
        raise MtkitError(f"{directory}: data not prepared; run `mtkit prepare -c CONFIG` first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["tokenizer_fingerprint"]  # noqa: B018 - validates the shape
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MtkitError(f"{path}: unreadable report ({_one_line(err)}); rerun `mtkit prepare`") from None
    return report
