"""Prepared data: clean, filter, de-duplicate and encode the corpora (read by
``mtkit.corpus``), and store them as Arrow IPC files that training memory-maps.

``prepare(config)`` writes ``{experiment.dir}/data/``::

    train.arrow  valid.arrow  test.arrow   one Arrow IPC file per configured split
    report.json  report.txt                counts, the tokenizer fingerprint and vocabulary sizes,
                                           the format version, each split file's size and checksum

Each ``.arrow`` file is an uncompressed Arrow IPC file (random-access format) of record
batches with columns ``src``, ``tgt`` (cleaned text, string), ``src_ids``, ``tgt_ids``
(subword ids without BOS/EOS, list<int32>) and ``src_len``, ``tgt_len`` (int32). ``load_split``
reads one by memory map, without copying; so can plain pyarrow. docs/data-format.md has the
details. Before pyarrow reads a split, ``load_split`` checks its size and checksum
(``mtkit.integrity``); then the Arrow buffers are validated and every id checked against the
vocabulary, so damaged data is a one-line error, never a crash or a silent load.

Everything streams in chunks of ``data.chunk_size`` pairs: memory is bounded by the chunk
and the de-duplication set (a 64-bit hash per kept pair, about 60 bytes in a Python set),
never by the corpus text. The whole ``data/`` directory is written under a temporary name
and renamed at the end, so a failed or killed run leaves no complete-looking output.

Training pairs are filtered; each dropped pair is counted under the first check it fails, in
the order of ``DROP_REASONS``. Valid and test pairs are kept line for line (normalised only;
an empty line stays, so references stay aligned), except a pair that is not UTF-8 under
``data.invalid_utf8=skip``, which is dropped and counted in every split.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import pyarrow as pa

from mtkit.config import Config, CorpusConfig, DataConfig, save_config
from mtkit.corpus import normalize, read_corpus, training_text, utf8_pairs
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, fsync_path
from mtkit.integrity import file_checksum, verify_file, warn_unverified
from mtkit.rundir import ExperimentDir
from mtkit.tokenizer import Languages, Tokenizers, language_prefixes, tokenizer_dir, train_tokenizers

SPLITS = ("train", "valid", "test")
DROP_REASONS = ("invalid_utf8", "empty", "duplicate", "eval_overlap", "too_short", "too_long", "ratio")
"""Why a pair was dropped, in the order the checks run."""

FORMAT = 1
"""Version of the layout of ``data/`` (``format`` in report.json); docs/data-format.md."""

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
"""The columns of every split file, in order."""


def data_dir(exp_dir: Path) -> Path:
    return ExperimentDir(exp_dir).data


def split_file(directory: Path, split: str) -> Path:
    """The Arrow file of ``split`` in a data directory."""
    return Path(directory) / f"{split}.arrow"


def train_tokenizer(config: Config) -> Tokenizers:
    """Train the experiment's tokenizer on ``data.train`` (the readers and normalisation of
    ``prepare``) into ``{experiment.dir}/tokenizer/``, and save the resolved config there.
    When fine-tuning (``pretrained``), copy the pretrained model's tokenizer there instead."""
    from mtkit.checkpoint import pretrained_checkpoint

    pretrained = pretrained_checkpoint(config)
    if pretrained is not None:
        tokenizers = copy_pretrained_tokenizer(pretrained, tokenizer_dir(config))
    else:
        languages = trained_languages(config.data)
        settings = config.tokenizer
        if languages is not None:  # the language tokens: never split, right after the special ids
            symbols = dict.fromkeys([*languages.tokens.values(), *settings.user_symbols])
            settings = settings.model_copy(update={"user_symbols": list(symbols)})
        tokenizers = train_tokenizers(
            settings,
            tokenizer_dir(config),
            lambda sides: training_text(config.data, sides),
            seed=config.experiment.seed,
            languages=languages,
        )
    save_config(config, config.experiment.dir / "config.yaml")
    return tokenizers


def trained_languages(data: DataConfig) -> Languages | None:
    """The language tokens of a model trained on ``data``'s directions: ``<2xx>`` for each
    target language (``data.language_token`` says where); None for one direction."""
    return Languages.tags(data.directions(), data.language_token) if data.multilingual else None


def copy_pretrained_tokenizer(checkpoint: Path, directory: Path) -> Tokenizers:
    """The tokenizer of ``checkpoint``, copied to ``directory`` (replaced atomically). A
    multilingual model's language tokens go with it: prepare frames each pair with them."""
    from mtkit.checkpoint import TOKENIZER

    tokenizers = Tokenizers.load(checkpoint / TOKENIZER)
    with atomic_dir(directory) as tmp:
        tokenizers.copy_to(tmp)
    return Tokenizers.load(directory)


# --------------------------------------------------------------------------- the report


@dataclass
class SplitReport:
    """Counts for one split: every pair read is either kept or dropped for one reason."""

    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    src_tokens: int = 0
    tgt_tokens: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    """The kept pairs of each corpus, in row order (``src_lang``, ``tgt_lang``, ``pairs``): a
    corpus's pairs are consecutive rows of the split file."""


@dataclass(frozen=True)
class Group:
    """The rows ``[start, end)`` of a prepared split: pairs of one corpus, in one direction."""

    src_lang: str
    tgt_lang: str
    start: int
    end: int

    @property
    def direction(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"


@dataclass
class PrepareReport:
    tokenizer_fingerprint: str
    """sha256 of the tokenizer model(s) the ids come from (see ``Tokenizers.fingerprint``)."""
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    """Every id of the splits is below these (0 in reports written before they were recorded)."""
    format: int = FORMAT
    """Version of the layout of ``data/`` (see ``FORMAT``)."""
    splits: dict[str, SplitReport] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall-clock time of the whole prepare (after imports)."""
    cpu_seconds: float = 0.0
    """CPU time over the same span, of this process and its encoding workers."""
    files: dict[str, int] = field(default_factory=dict)
    """Byte size of each split file, by name (``train.arrow``)."""
    checksums: dict[str, str] = field(default_factory=dict)
    """Checksum of each split file (``mtkit.integrity``), verified by ``load_split``."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_text(self) -> str:
        """A table a person can read: one row per split, one column per count."""
        header = ["split", "read", "kept", *DROP_REASONS, "src_tokens", "tgt_tokens"]
        rows: list[list[object]] = [list(header)]
        for name, s in self.splits.items():
            rows.append([name, s.read, s.kept, *(s.dropped[r] for r in DROP_REASONS), s.src_tokens, s.tgt_tokens])
        directions = {name: _direction_counts(s.groups) for name, s in self.splits.items()}
        several = any(len(counts) > 1 for counts in directions.values())
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        if several:  # a multilingual experiment: the kept pairs of each direction
            for name, counts in directions.items():
                lines.append(f"{name} pairs by direction: " + ", ".join(f"{d} {n}" for d, n in counts.items()))
        lines.append(f"tokenizer_fingerprint {self.tokenizer_fingerprint}")
        lines.append(f"seconds {self.seconds:.1f} (cpu {self.cpu_seconds:.1f})")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- prepare


def _direction_counts(groups: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        direction = f"{group['src_lang']}-{group['tgt_lang']}"
        counts[direction] = counts.get(direction, 0) + int(group["pairs"])
    return counts


def prepare(config: Config) -> PrepareReport:
    """Read, clean, filter, de-duplicate and encode the corpora of ``config.data`` into
    ``{experiment.dir}/data`` (replaced atomically) and return the report."""
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    data = config.data
    if not data.train:
        raise MtkitError("data.train: no training corpora configured")
    tokenizers = Tokenizers.load(tokenizer_dir(config))
    _check_languages(config, tokenizers)
    exp_dir = config.experiment.dir
    out = data_dir(exp_dir)
    for stale in exp_dir.glob(f".{out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    report = PrepareReport(tokenizers.fingerprint(), tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    with atomic_dir(out) as tmp:
        # Valid and test first: training pairs whose source they contain may be removed.
        eval_sources: set[int] = set()
        splits: dict[str, list[CorpusConfig]] = {"valid": list(data.eval_sets("valid")),
                                                 "test": list(data.eval_sets("test"))}
        splits["train"] = data.train
        for split, corpora in splits.items():
            if not corpora:
                continue
            stats = _prepare_split(split, corpora, data, tokenizers, tmp, eval_sources)
            report.splits[split] = stats
            written = split_file(tmp, split)
            fsync_path(written)  # on disk before the directory's rename makes it current
            report.files[written.name] = written.stat().st_size
            report.checksums[written.name] = file_checksum(written)
            if stats.kept == 0:
                raise MtkitError(f"data.{split}: no pairs left ({_drop_summary(stats)})")
        report.seconds = time.perf_counter() - start
        report.cpu_seconds = _cpu_seconds() - start_cpu
        # Plain writes: inside the temporary directory, whose rename is the atomic step.
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.txt").write_text(report.to_text(), encoding="utf-8")
    save_config(config, exp_dir / "config.yaml")
    return report


def _check_languages(config: Config, tokenizers: Tokenizers) -> None:
    """A tokenizer mtkit trained must have the language tokens of the config's directions (a
    pretrained model's, copied when fine-tuning, are its own)."""
    if config.pretrained.given:  # (a test that needs no torch: prepare never imports it)
        return
    wanted, found = trained_languages(config.data), tokenizers.languages
    if wanted != found:
        def say(languages: Languages | None) -> str:
            if languages is None:
                return "one direction"
            return f"{languages.names()}, language_token {'source' if languages.source else 'target'}"

        raise MtkitError(f"{tokenizer_dir(config)}: the tokenizer was trained for {say(found)}, the config "
                         f"has {say(wanted)}; run `mtkit tokenizer train -c CONFIG` again")


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
    directions = [data.direction(corpus) for corpus in corpora]
    stats.groups = [{"src_lang": s, "tgt_lang": t, "pairs": 0} for s, t in directions]
    # The language tokens each corpus's pairs start with (none for a model without them).
    prefixes = [language_prefixes(tokenizers, s, t) for s, t in directions]
    chunks = _clean_chunks(split, corpora, data, stats, eval_sources, multilingual=len(set(directions)) > 1)
    # One record batch per chunk, so memory stays bounded by the chunk; the IPC file format
    # (not the stream format) ends in a footer that lets readers map the batches in place.
    with pa.OSFile(str(split_file(out, split)), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for corpus, encoded in _encode_all(chunks, prefixes, tokenizers, limits, data.num_proc):
            writer.write_batch(encoded.batch)
            stats.groups[corpus]["pairs"] += encoded.batch.num_rows
            stats.kept += encoded.batch.num_rows
            stats.src_tokens += encoded.src_tokens
            stats.tgt_tokens += encoded.tgt_tokens
            for reason in ("too_short", "too_long", "ratio"):
                stats.dropped[reason] += getattr(encoded, reason)
    return stats


def _clean_chunks(
    split: str, corpora: list[CorpusConfig], data: DataConfig, stats: SplitReport, eval_sources: set[int],
    multilingual: bool = False,
) -> Iterator[tuple[int, list[str], list[str]]]:
    """Normalised pairs, chunk by chunk, each with the number of its corpus; for training,
    without empty, duplicate and (if asked) valid/test pairs. Counts what it reads and drops in
    ``stats``; for valid/test, adds the hashes of the sources to ``eval_sources``. With several
    directions, a pair is a duplicate only within its direction."""
    train = split == "train"
    # 64-bit hashes of the kept pairs, not the pairs: ~60 bytes a pair in a Python set.
    # Python's str hash is SipHash, randomised per process but fixed within this run.
    seen: set[int] = set()
    for number, corpus in enumerate(corpora):
        direction = data.direction(corpus) if multilingual else None
        for raw_src, raw_tgt in read_corpus(corpus, data.invalid_utf8, data.chunk_size):
            stats.read += len(raw_src)
            if data.invalid_utf8 == "skip":  # (only this policy leaves None for a line)
                valid_src, valid_tgt = utf8_pairs(raw_src, raw_tgt)
                stats.dropped["invalid_utf8"] += len(raw_src) - len(valid_src)
            else:
                valid_src, valid_tgt = raw_src, raw_tgt
            src, tgt = normalize(valid_src), normalize(valid_tgt)
            if train:
                src, tgt = _clean(src, tgt, data, stats, seen, eval_sources, direction)
            else:
                eval_sources.update(map(hash, src))
            if src:
                yield number, src, tgt


def _clean(
    src: list[str], tgt: list[str], data: DataConfig, stats: SplitReport, seen: set[int], eval_sources: set[int],
    direction: tuple[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Training pairs that are non-empty, not seen before and not in valid/test."""
    dedup, check_overlap = data.dedup, data.remove_eval_overlap and bool(eval_sources)
    pairs = zip(src, tgt, strict=True) if direction is None else zip(src, tgt, repeat(direction))
    keys = list(map(hash, pairs)) if dedup else []
    # Most chunks drop nothing: tell that with set operations, before any loop over the pairs.
    if (all(src) and all(tgt) and (not dedup or (len(set(keys)) == len(keys) and seen.isdisjoint(keys)))
            and not (check_overlap and not eval_sources.isdisjoint(map(hash, src)))):
        seen.update(keys)
        return src, tgt
    rows: list[int] = []
    empty = duplicate = overlap = 0
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        if not s or not t:
            empty += 1
            continue
        if dedup:
            if keys[i] in seen:
                duplicate += 1
                continue
            seen.add(keys[i])
        if check_overlap and hash(s) in eval_sources:
            overlap += 1
            continue
        rows.append(i)
    stats.dropped["empty"] += empty
    stats.dropped["duplicate"] += duplicate
    stats.dropped["eval_overlap"] += overlap
    return [src[i] for i in rows], [tgt[i] for i in rows]


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


Prefixes = tuple[list[int], list[int]]
"""The ids a corpus's sources and targets start with: its language tokens."""


def _encode(src: list[str], tgt: list[str], tokenizers: Tokenizers) -> tuple[list[list[int]], list[list[int]]]:
    """The subword ids of a chunk's sources and targets (what the encoding threads do)."""
    return tokenizers.encode_source(src), tokenizers.tgt.encode(tgt)


def _batch(src: list[str], tgt: list[str], src_ids: list[list[int]], tgt_ids: list[list[int]],
           limits: _Limits | None, prefixes: Prefixes = ([], [])) -> _Encoded:
    """An encoded chunk as a record batch, each side after its ``prefixes``; given ``limits``
    (training), without the pairs they drop by token length."""
    for ids, prefix in ((src_ids, prefixes[0]), (tgt_ids, prefixes[1])):
        if prefix:
            ids[:] = [prefix + seq for seq in ids]
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
    chunks: Iterator[tuple[int, list[str], list[str]]], prefixes: list[Prefixes], tokenizers: Tokenizers,
    limits: _Limits | None, num_proc: int,
) -> Iterator[tuple[int, _Encoded]]:
    """Encode chunks (each with its corpus's number, which picks its ``prefixes``), in order, in
    ``num_proc`` threads, while this one reads and cleans the next chunks and turns the encoded
    ones into record batches. SentencePiece lets go of the GIL while it encodes, so the two
    overlap; the threads do nothing else, as they are the bottleneck. (Measured faster than
    worker processes, which pay for pickling both ways.) At most two chunks per thread are in
    flight, so memory stays bounded."""
    with ThreadPoolExecutor(num_proc, thread_name_prefix="mtkit-encode") as pool:
        pending: deque[tuple[int, list[str], list[str], Future[tuple[list[list[int]], list[list[int]]]]]] = deque()
        for corpus, src, tgt in chunks:
            pending.append((corpus, src, tgt, pool.submit(_encode, src, tgt, tokenizers)))
            if len(pending) >= 2 * num_proc:
                corpus, src, tgt, future = pending.popleft()
                yield corpus, _batch(src, tgt, *future.result(), limits, prefixes[corpus])
        while pending:
            corpus, src, tgt, future = pending.popleft()
            yield corpus, _batch(src, tgt, *future.result(), limits, prefixes[corpus])


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


# --------------------------------------------------------------------------- reading prepared data


class PreparedSplit:
    """One prepared split: ``table`` is its Arrow table, memory-mapped from the split file.

    Besides the table, it offers what its readers need as Python objects: ``split["src"]`` (a
    column as a list), ``split[i]`` (a row as a dict), ``split[a:b]`` (a dict of lists),
    ``len``, ``select`` and ``to_dict``.
    """

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    @overload
    def __getitem__(self, key: str) -> list[Any]: ...
    @overload
    def __getitem__(self, key: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, key: slice) -> dict[str, list[Any]]: ...

    def __getitem__(self, key: str | int | slice) -> list[Any] | dict[str, Any]:
        if isinstance(key, str):
            return self.table.column(key).to_pylist()
        if isinstance(key, slice):
            rows = range(len(self))[key]
            if rows.step == 1:
                return self.table.slice(rows.start, len(rows)).to_pydict()
            return self.select(rows).to_dict()
        row = range(len(self))[key]  # IndexError past the end, as for a list
        return self.table.slice(row, 1).to_pylist()[0]

    def select(self, indices: Iterable[int]) -> PreparedSplit:
        """The rows ``indices``, in that order (a copy, no longer memory-mapped)."""
        return PreparedSplit(self.table.take(pa.array(list(indices), pa.int64())))

    def to_dict(self) -> dict[str, list[Any]]:
        """Every column as a list."""
        return self.table.to_pydict()


PREPARE_AGAIN = "run `mtkit prepare` again"


def load_split(exp_dir: Path, split: str) -> PreparedSplit:
    """A prepared split, memory-mapped. MtkitError if it was not prepared (or by another mtkit),
    or is damaged: its size or checksum differ from the report's, its Arrow buffers are invalid,
    or an id lies outside the tokenizer's vocabulary."""
    if split not in SPLITS:
        raise MtkitError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    directory = data_dir(exp_dir)
    report = _read_report(directory)
    path = split_file(directory, split)
    if not path.is_file():
        raise MtkitError(f"{directory}: no {split} split (data.{split} was not configured when preparing)")
    if "checksums" in report:
        verify_file(path, report["checksums"].get(path.name), size=report.get("files", {}).get(path.name),
                    remedy=PREPARE_AGAIN)
    else:
        warn_unverified(directory)
    try:
        # The table's buffers point into the mapping and keep it alive after the file closes.
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        # Offsets within their buffers, valid UTF-8: what the readers below take for granted.
        table.validate(full=True)
    except (OSError, ValueError) as err:  # pa.ArrowInvalid is a ValueError
        raise MtkitError(f"{path}: unreadable prepared data ({_one_line(err)}); {PREPARE_AGAIN}") from None
    if not table.schema.equals(SCHEMA):
        raise MtkitError(f"{path}: unexpected columns ({', '.join(table.column_names)}); {PREPARE_AGAIN}")
    _check_ids(path, table, _vocab_sizes(exp_dir, report))
    return PreparedSplit(table)


def _check_ids(path: Path, table: pa.Table, vocab_sizes: tuple[int, int] | None) -> None:
    """MtkitError for a null value, or an id outside ``[0, vocab size)`` (None: sizes unknown),
    which would index past the embeddings in training."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.null_count:
            raise MtkitError(f"{path}: {column.null_count} missing values in column {name}; {PREPARE_AGAIN}")
    if vocab_sizes is None:
        return
    for name, size in zip(("src_ids", "tgt_ids"), vocab_sizes, strict=True):
        for chunk in table.column(name).chunks:
            ids = np.asarray(chunk.flatten())
            low, high = (int(ids.min()), int(ids.max())) if len(ids) else (0, 0)
            if low < 0 or high >= size:
                bad = low if low < 0 else high
                raise MtkitError(f"{path}: id {bad} in column {name} is outside the tokenizer's vocabulary "
                                 f"(0 to {size - 1}); {PREPARE_AGAIN}")


def _vocab_sizes(exp_dir: Path, report: dict[str, Any]) -> tuple[int, int] | None:
    """The vocabulary sizes the report records; for a report from before they were recorded,
    those of the experiment's tokenizer if it is the one the data was encoded with."""
    if report.get("src_vocab_size") and report.get("tgt_vocab_size"):
        return int(report["src_vocab_size"]), int(report["tgt_vocab_size"])
    from mtkit.tokenizer import read_meta

    try:
        meta = read_meta(ExperimentDir(exp_dir).tokenizer)
        if meta["fingerprint"] == report["tokenizer_fingerprint"]:
            return int(meta["vocab_size"]["src"]), int(meta["vocab_size"]["tgt"])
    except (MtkitError, KeyError, TypeError, ValueError):
        pass
    return None


def split_groups(exp_dir: Path, split: str) -> list[Group]:
    """The row ranges of ``split``'s corpora, with their directions; one group of the whole split
    for data prepared before prepare recorded them."""
    report = _read_report(data_dir(exp_dir))
    stats = report.get("splits", {}).get(split) or {}
    groups, start = [], 0
    try:
        for group in stats.get("groups") or []:
            end = start + int(group["pairs"])
            groups.append(Group(str(group["src_lang"]), str(group["tgt_lang"]), start, end))
            start = end
    except (KeyError, TypeError, ValueError):
        raise MtkitError(f"{data_dir(exp_dir) / 'report.json'}: malformed groups of the {split} split; "
                         f"{PREPARE_AGAIN}") from None
    if groups and start != int(stats.get("kept", -1)):
        raise MtkitError(f"{data_dir(exp_dir) / 'report.json'}: the {split} split's groups hold {start} pairs, "
                         f"it has {stats.get('kept')}; {PREPARE_AGAIN}")
    return groups or [Group("src", "tgt", 0, int(stats.get("kept", 0)))]


def prepared_fingerprint(exp_dir: Path) -> str:
    """The fingerprint of the tokenizer the prepared data was encoded with."""
    return str(_read_report(data_dir(exp_dir))["tokenizer_fingerprint"])


def _read_report(directory: Path) -> dict[str, Any]:
    """report.json, which prepare writes last: its presence means the data is complete."""
    path = directory / "report.json"
    if not path.is_file():
        raise MtkitError(f"{directory}: data not prepared; run `mtkit prepare -c CONFIG` first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["tokenizer_fingerprint"]  # noqa: B018 - validates the shape
        version = report.get("format")
        for key, kind in (("files", int), ("checksums", str)):  # absent in reports before checksums
            entries = report.get(key, {})
            if not isinstance(entries, dict) or not all(isinstance(v, kind) for v in entries.values()):
                raise TypeError(f"'{key}' is not a mapping of file names to {kind.__name__}")
        for key in ("src_vocab_size", "tgt_vocab_size"):
            if not isinstance(report.get(key, 0), int):
                raise TypeError(f"'{key}' is not an integer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise MtkitError(f"{path}: unreadable report ({_one_line(err)}); run `mtkit prepare` again") from None
    if version != FORMAT:
        # Before format 1, each split was a directory in the layout of datasets.save_to_disk.
        raise MtkitError(
            f"{directory}: prepared by another version of mtkit (data format {version or 0}, "
            f"this one reads {FORMAT}); run `mtkit prepare -c CONFIG` again"
        )
    return report


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)
