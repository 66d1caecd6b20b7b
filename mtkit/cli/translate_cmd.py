"""``mtkit translate``: translate text with a trained checkpoint, streaming in bounded memory.

Decoding settings come from the config stored in the checkpoint, then the ``decode`` section
of ``-c CONFIG``, then ``--set decode.KEY=VALUE``, then the flags, each overriding the last.

Every input line gives exactly one output line, in order: lines are read as bytes split on
``\\n`` only (a trailing ``\\r`` is dropped, so CRLF input translates like LF input; invalid
UTF-8 is replaced with U+FFFD and warned about); an empty line gives an empty line; a line
longer than the model accepts is truncated with a warning on stderr; no output line ever
contains a line break. Input is read ``--chunk-lines`` lines at a time, each chunk sorted and
batched by length, translated, and written (and flushed) in input order, so memory stays
bounded and ``mtkit translate ... | head`` stops early and quietly.

Scale-out: ``torchrun --nproc_per_node N -m mtkit translate -m RUN -i FILE -o OUT`` starts N
processes that all read FILE; each translates every N-th line of each chunk (on GPU
``cuda:LOCAL_RANK``), and rank 0 gathers the chunk and writes it in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import IO, Annotated

import typer

from mtkit.cli.options import OptionalConfigOption, SetOption
from mtkit.errors import MtkitError, check_cuda_index


class OutputFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


def _flag(*names: str, help: str):
    """An option without a shown default (None: keep the configured value)."""
    return typer.Option(*names, help=help, show_default=False)


def translate(
    model: Annotated[
        Path, _flag("--model", "-m", help="Run directory (its best, else last, checkpoint) or a checkpoint directory.")
    ],
    input: Annotated[str, typer.Option("--input", "-i", help="Source text (plain or .gz), or - for stdin.")] = "-",
    output: Annotated[str, typer.Option("--output", "-o", help="Output file (atomic), or - for stdout.")] = "-",
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    beam: Annotated[int | None, _flag("--beam", help="Beam size (1: greedy).")] = None,
    lenpen: Annotated[float | None, _flag("--lenpen", help="GNMT length-penalty alpha.")] = None,
    max_len_a: Annotated[float | None, _flag("--max-len-a", help="Max output length = a * source length + b.")] = None,
    max_len_b: Annotated[int | None, _flag("--max-len-b", help="See --max-len-a.")] = None,
    min_len: Annotated[int | None, _flag("--min-len", help="Minimum output length in subwords.")] = None,
    nbest: Annotated[int | None, _flag("--nbest", help="Hypotheses per line (needs --output-format jsonl).")] = None,
    batch_tokens: Annotated[int | None, _flag("--batch-tokens", help="Source tokens per batch.")] = None,
    sampling: Annotated[bool | None, _flag("--sampling/--no-sampling", help="Sample instead of beam search.")] = None,
    temperature: Annotated[float | None, _flag("--temperature", help="Sampling temperature.")] = None,
    top_k: Annotated[int | None, _flag("--top-k", help="Sample from the k most likely tokens (0: all).")] = None,
    top_p: Annotated[float | None, _flag("--top-p", help="Nucleus sampling threshold.")] = None,
    seed: Annotated[int | None, _flag("--seed", help="Sampling seed (default: experiment.seed).")] = None,
    prefix: Annotated[Path | None, _flag("--prefix", help="Target prefixes, one per input line (empty: none).")] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--output-format", "-f", help="text: one translation a line; jsonl: with score and n-best list."),
    ] = OutputFormat.text,
    ref: Annotated[Path | None, _flag("--ref", help="Reference: print BLEU/chrF/TER on stderr at the end.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[int | None, _flag("--threads", help="CPU threads for torch.")] = None,
    chunk_lines: Annotated[
        int, typer.Option("--chunk-lines", help="Lines read, sorted and translated at a time.", min=1)
    ] = 10_000,
) -> None:
    """Translate text with a trained model: one output line per input line."""
    import torch

    from mtkit.checkpoint import load_for_inference
    from mtkit.translate import Translator

    flags = dict(beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len, nbest=nbest,
                 batch_tokens=batch_tokens, sampling=sampling, temperature=temperature, top_k=top_k, top_p=top_p)
    if nbest is not None and nbest > 1 and output_format is OutputFormat.text:
        raise MtkitError("--nbest > 1 needs --output-format jsonl (text output has one line per input line)")
    if threads is not None:
        torch.set_num_threads(threads)
    device = _pick_device(device, torch)
    device, shard = _join_torchrun(device, torch)
    if shard is not None and (input == "-" or prefix == Path("-")):
        raise MtkitError("under torchrun every rank reads the input: name a file with -i (not stdin)")
    leader = shard is None or shard.rank == 0
    # Open every input before loading the model, so a wrong path fails at once.
    lines = _read_source(input)
    prefixes = _read_source(str(prefix), "prefix file") if prefix is not None else None
    references = _read_reference(ref) if ref is not None and leader else None
    loaded = load_for_inference(model, device=device)
    decode = resolve_decode(loaded.config.decode, config, overrides, flags)
    translator = Translator(loaded.model, loaded.tokenizers, decode, device,
                            seed=loaded.config.experiment.seed if seed is None else seed, warn=_warn)

    progress = _Progress() if leader and sys.stderr.isatty() else None
    best: list[str] | None = [] if references is not None else None
    count = 0
    with _open_output(output if leader else None) as sink:
        for chunk in translator.translate_stream(lines, prefixes, chunk_lines=chunk_lines, shard=shard):
            sink.write(_format(chunk, output_format).encode("utf-8"))
            sink.flush()
            count += len(chunk)
            if best is not None:
                best.extend(t.text for t in chunk)
            if progress:
                progress.update(count)
        if leader and prefixes is not None and next(prefixes, None) is not None:
            raise MtkitError(f"{prefix}: more lines than the input ({count})")
    if progress:
        progress.done(count)
    if shard is not None:
        torch.distributed.destroy_process_group()
    if references is not None and best is not None:
        _print_scores(best, references, ref, loaded.config.data.tgt_lang)


def _join_torchrun(device: str, torch):
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device
    and ``Shard``; otherwise ``(device, None)``."""
    from mtkit.translate import Shard

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, None
    import torch.distributed as dist

    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_cuda_index(local_rank, f"--device {device}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()

    def gather(part):
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        return parts

    return device, Shard(rank, world, gather)


def resolve_decode(stored, config: Path | None, overrides: list[str] | None, flags: dict):
    """The decode settings: ``stored`` (the checkpoint's), then ``config``'s decode section,
    then ``--set decode.*`` overrides, then the non-None ``flags``."""
    from mtkit.config import apply_overrides, load_config, validate_config

    merged = stored.model_dump()
    if config is not None:
        merged.update(load_config(config).decode.model_dump(exclude_unset=True))
    data = apply_overrides({"decode": merged}, overrides or [])
    others = sorted(set(data) - {"decode"})
    if others:
        raise MtkitError(f"--set: translate takes only decode.* keys (got {', '.join(others)})")
    if isinstance(data["decode"], dict):
        data["decode"].update({key: value for key, value in flags.items() if value is not None})
    return validate_config(data).decode


def _pick_device(name: str, torch) -> str:
    from mtkit.config import DEVICE_NAME

    if not DEVICE_NAME.fullmatch(name):
        raise MtkitError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MtkitError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:"):
        check_cuda_index(int(name.removeprefix("cuda:")), f"--device {name}")
    return name


def _warn(message: str) -> None:
    typer.echo(f"mtkit: warning: {message}", err=True)


def _read_source(name: str, what: str = "input") -> Iterator[str]:
    """Lines of a file or stdin, split on ``\\n`` only, without ``\\r\\n``; invalid UTF-8
    replaced (with a warning naming the line)."""
    from mtkit.fileio import open_binary

    if name == "-":
        handle: IO[bytes] = sys.stdin.buffer
        label = "<stdin>"
    else:
        handle = open_binary(Path(name))
        label = name
    return _decode_lines(handle, label, what)


def _decode_lines(handle: IO[bytes], label: str, what: str) -> Iterator[str]:
    import gzip

    number = 0
    try:
        for number, raw in enumerate(handle, start=1):  # noqa: B007
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _warn(f"{label}:{number}: invalid UTF-8 (byte {err.start}) replaced with U+FFFD")
                text = raw.decode("utf-8", errors="replace")
            yield text.rstrip("\n").rstrip("\r")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise MtkitError(f"{label}: unreadable {what} after line {number}: {reason}") from None


@contextlib.contextmanager
def _open_output(name: str | None) -> Iterator[IO[bytes]]:
    """stdout, or a temporary file beside ``name`` renamed to it only on success; None:
    a sink that drops everything (torchrun ranks other than 0)."""
    if name is None:
        yield _NullSink()
        return
    if name == "-":
        yield sys.stdout.buffer if hasattr(sys.stdout, "buffer") else _TextSink(sys.stdout)
        return
    path = Path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    try:
        with _FileSink(fd, path) as sink:
            yield sink
            sink.sync()
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _FileSink:
    """Bytes to a file descriptor, unbuffered (the caller writes a whole chunk at a time); a
    failed write (a full disk) is a one-line error naming the output, not a traceback."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            raise MtkitError(f"{self.path}: cannot write: {err.strerror}") from None

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise MtkitError(f"{self.path}: cannot write: {err.strerror}") from None

    def __enter__(self) -> _FileSink:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _NullSink:
    def write(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


class _TextSink:
    """Bytes onto a text stream without a ``buffer`` (rare: some embedding hosts)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode("utf-8"))

    def flush(self) -> None:
        self.stream.flush()


def _format(chunk, output_format: OutputFormat) -> str:
    if output_format is OutputFormat.text:
        return "".join(t.text + "\n" for t in chunk)
    rows = []
    for t in chunk:
        record = {"translation": t.text, "score": t.score,
                  "nbest": [{"translation": text, "score": score} for text, score in t.nbest]}
        rows.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(rows)


def _read_reference(ref: Path) -> list[str]:
    from mtkit.score import read_text

    return read_text(ref)


def _print_scores(hyps: list[str], refs: list[str], ref: Path, tgt_lang: str) -> None:
    from mtkit.score import score

    if len(refs) != len(hyps):
        raise MtkitError(f"{ref}: {len(refs)} lines but the input has {len(hyps)}")
    for result in score(hyps, [refs], tgt_lang=tgt_lang):
        typer.echo(result.text, err=True)


class _Progress:
    """Lines per second on a terminal's stderr, rewritten in place."""

    def __init__(self):
        self.start = time.monotonic()

    def update(self, count: int) -> None:
        rate = count / max(time.monotonic() - self.start, 1e-9)
        sys.stderr.write(f"\rtranslated {count} lines ({rate:.1f} lines/s)")
        sys.stderr.flush()

    def done(self, count: int) -> None:
        self.update(count)
        sys.stderr.write("\n")
