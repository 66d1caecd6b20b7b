"""Files: one line reader and one atomic writer.

Reading: ``read_lines`` is the one way mtkit reads text, from a plain or gzip file or from
stdin (``-``), streaming. Line endings: lines are split on ``\\n`` only; the ``\\n`` and any
``\\r`` right before it are dropped, so CRLF input reads like LF input, while a ``\\r`` inside a
line (or any other Unicode line break) stays part of it; a last line needs no ``\\n``. Invalid
UTF-8 follows an explicit policy chosen by the caller: ``error`` (a one-line MtkitError naming
the file and line), ``skip`` (None in the line's place, so parallel files stay aligned) or
``replace`` (U+FFFD, with a warning naming the line). ``read_lines`` returns a ``LineReader``,
whose ``ready(timeout)`` tells whether the next line has arrived: input from a pipe or a
terminal may pause, and a command can act on what it has rather than wait (``mtkit translate``).

Writing: a command that fails or is killed never leaves an output that looks complete.
``atomic_writer`` streams into a temporary file beside the target and renames it into place
only when the writing succeeded; ``atomic_dir`` does the same for a whole directory.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import select
import shutil
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Literal, Protocol, TypeVar, cast, overload

from mtkit.errors import MtkitError

log = logging.getLogger(__name__)

INVALID_UTF8_POLICIES: tuple[str, ...] = ("error", "skip", "replace")
STDIN = STDOUT = "-"
"""The name under which ``read_lines`` reads stdin and ``open_output`` writes to stdout."""
SKIP_HINT = "set data.invalid_utf8=skip to skip such lines"
"""What ``read_lines`` has always suggested for a bad line (prepared corpora can skip them)."""


def fsync_path(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fsync_path(path)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MtkitError(f"{path}: cannot create directory: {err.strerror}") from None


# --------------------------------------------------------------------------- writing


class AtomicSink:
    """The binary stream ``atomic_writer`` yields: ``write(bytes)`` and ``flush()`` (which
    hands what was written to the operating system, so a reader of the temporary file, or a
    kill, sees every flushed chunk). A failed write (a full disk, a file-size limit) is a
    one-line MtkitError naming the target, not a traceback."""

    def __init__(self, handle: IO[bytes], path: Path):
        self._handle = handle
        self.path = path

    def write(self, data: bytes) -> None:
        try:
            self._handle.write(data)
        except OSError as err:
            raise MtkitError(f"{self.path}: cannot write: {err.strerror}") from None

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as err:
            raise MtkitError(f"{self.path}: cannot write: {err.strerror}") from None


@contextlib.contextmanager
def atomic_writer(path: Path | str) -> Iterator[AtomicSink]:
    """Yield a sink writing to a temporary file beside ``path`` (``.NAME.*.tmp``); when the
    block ends normally the file is flushed, fsynced and renamed to ``path``, so readers see
    either the old file or the whole new one. On an exception (Ctrl-C and SIGTERM included)
    the temporary file is removed and ``path`` keeps its previous content. Any failure to
    create, write or rename is a one-line MtkitError naming ``path``."""
    path = Path(path)
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    handle = open(fd, "wb")  # noqa: SIM115 - closed below, on success and on failure
    try:
        sink = AtomicSink(handle, path)
        yield sink
        sink.flush()
        try:
            os.fsync(handle.fileno())
            handle.close()
            os.replace(tmp, path)
        except OSError as err:
            raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    except BaseException:
        # Closing flushes what is still buffered, which fails again on a full disk: the
        # error that matters is the one already on its way.
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class BinarySink(Protocol):
    """What an output is written to: ``atomic_writer``'s sink, stdout's bytes."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


@contextlib.contextmanager
def open_output(name: str | None) -> Iterator[BinarySink]:
    """A command's output: ``atomic_writer(name)`` for a file name, stdout's bytes for ``-``
    (as a command line gives it), and for None an empty in-memory sink (for a torchrun rank
    other than 0, which has nothing to write)."""
    if name is None:
        yield io.BytesIO()
    elif name == STDOUT:
        buffer = getattr(sys.stdout, "buffer", None)
        yield buffer if buffer is not None else _TextSink(sys.stdout)
    else:
        with atomic_writer(name) as sink:
            yield sink


class _TextSink:
    """Bytes onto a text stream without a ``buffer`` (some embedding hosts replace stdout)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, data: bytes, /) -> None:
        self.stream.write(data.decode("utf-8"))

    def flush(self) -> None:
        self.stream.flush()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_writer(path) as sink:
        sink.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    On an exception (or a kill) the temporary directory is removed (or left under a hidden
    ``.name.tmp-*`` name that no stage reads) and ``path`` keeps its previous content.
    """
    path = Path(path)
    _mkdir(path.parent)
    _recover_previous(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _recover_previous(path: Path) -> None:
    """A kill between the two renames of ``atomic_dir`` leaves the previous ``path`` under
    ``.name.old-PID`` and no ``path``: put it back (the last good state); otherwise remove such
    leftovers."""
    prefix = f".{path.name}.old-"
    olds = [entry for entry in path.parent.iterdir() if entry.name.startswith(prefix)]
    if olds and not path.exists():
        with contextlib.suppress(OSError):
            os.replace(olds.pop(), path)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what killed runs left behind (``.name.tmp-*`` directories and files)."""
    if not directory.is_dir():
        return
    for entry in directory.glob(".*.tmp*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def refuse_overlap(output: Path, inputs: Iterable[Path], what: str) -> None:
    """MtkitError unless ``output`` lies apart from every one of ``inputs`` (links resolved):
    ``atomic_dir`` replaces an output whole, so it must not be an input, hold one or lie in
    one. ``what`` names the inputs in the message (``the checkpoint``)."""
    out = Path(output).resolve()
    for path in inputs:
        source = Path(path).resolve()
        if out == source or out in source.parents:
            raise MtkitError(f"{output}: would replace {what} {path}; choose another output directory")
        if source in out.parents:
            raise MtkitError(f"{output}: lies inside {what} {path}; choose an output directory outside it")


# --------------------------------------------------------------------------- reading


def open_binary(path: Path) -> IO[bytes]:
    """Open a plain or gzip file for reading bytes; a one-line error if it cannot be read."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise MtkitError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MtkitError(f"{path}: is a directory, expected a file") from None
    except OSError as err:
        raise MtkitError(f"{path}: cannot read: {err.strerror}") from None
    if handle.peek(2)[:2] == b"\x1f\x8b":
        # Iterating a GzipFile runs Python code for every line; a BufferedReader over it does not.
        return io.BufferedReader(gzip.GzipFile(fileobj=handle, mode="rb"), 1 << 16)
    if path.suffix == ".gz":
        handle.close()
        raise MtkitError(f"{path}: not a gzip file (name ends in .gz)")
    return handle


T = TypeVar("T")


class LineReader(Iterator[T]):
    """The lines ``read_lines`` yields, plus what a reader of slow input needs to know.

    streaming: True when the input may pause (a pipe, a terminal, a socket), False for a file.
    terminal: True when the input is typed at a terminal.
    ready(timeout): True when the next line (or the end of the input) is there, waiting at
    most ``timeout`` seconds for it; a file is always ready.
    """

    def __init__(self, lines: Iterator[T], source: _PipeLines | None = None):
        self._lines = lines
        self._source = source
        self.streaming = source is not None
        self.terminal = source is not None and source.terminal

    def __next__(self) -> T:
        return next(self._lines)

    def ready(self, timeout: float = 0.0) -> bool:
        return self._source is None or self._source.ready(timeout)


class _PipeLines:
    """The raw lines (bytes, without their ``\\n``) of a pipe or a terminal, read as they
    arrive: a read returns what is there, so a line is available as soon as its ``\\n`` is, and
    ``ready`` can wait for the next one with ``select`` instead of blocking on it."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self._fd = handle.fileno()
        self.terminal = os.isatty(self._fd)
        self._lines: deque[bytes] = deque()  # complete lines not yet taken
        self._tail = b""  # the start of a line whose \n has not arrived yet
        self._eof = False

    def _read(self) -> None:
        # read1: what the buffered reader holds, else at most one read of the fd (which returns
        # whatever has arrived); b"" only at the end of the input.
        data = self._handle.read1(1 << 16)  # type: ignore[attr-defined]
        if not data:
            self._eof = True
            if self._tail:
                self._lines.append(self._tail)  # a last line needs no \n
                self._tail = b""
            return
        parts = (self._tail + data).split(b"\n")
        self._tail = parts.pop()
        self._lines.extend(parts)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            while not self._lines and not self._eof:
                self._read()
            if not self._lines:
                return
            yield self._lines.popleft()

    def ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._lines and not self._eof:
            readable, _, _ = select.select([self._fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not readable:
                return False
            self._read()
        return True


def _pipe_or_terminal(handle: IO[bytes]) -> bool:
    """Whether ``handle`` is an fd that may pause (anything but a regular file), readable
    with ``read1`` and ``select``."""
    try:
        mode = os.fstat(handle.fileno()).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):  # no fd: an in-memory stream (tests)
        return False
    return not stat.S_ISREG(mode) and hasattr(handle, "read1") and sys.platform != "win32"


@overload
def read_lines(
    source: Path | str,
    invalid_utf8: Literal["error", "replace"] = ...,
    *,
    what: str = ...,
    hint: str = ...,
    warn: Callable[[str], None] | None = ...,
) -> LineReader[str]: ...


@overload
def read_lines(
    source: Path | str,
    invalid_utf8: str,
    *,
    what: str = ...,
    hint: str = ...,
    warn: Callable[[str], None] | None = ...,
) -> LineReader[str | None]: ...


def read_lines(
    source: Path | str,
    invalid_utf8: str = "error",
    *,
    what: str = "",
    hint: str = SKIP_HINT,
    warn: Callable[[str], None] | None = None,
) -> LineReader[str] | LineReader[str | None]:
    """The lines of a plain or gzip UTF-8 file, or of stdin for the string ``-``, without line endings
    (see the module docstring), read lazily. The file is opened now, so a missing file fails
    at the call, not at the first line. A pipe or a terminal (stdin, or a named pipe such as
    ``<(command)``) is read as it arrives (``LineReader.ready``); stdin redirected from a file
    reads like the file.

    invalid_utf8: ``error``: MtkitError ``NAME:LINE: not valid UTF-8 (byte B); HINT``;
    ``skip``: yield None for the line; ``replace``: decode it with U+FFFD and call ``warn``
    (default: logging) with ``NAME:LINE: invalid UTF-8 (byte B) replaced with U+FFFD``.
    what: names the stream in ``NAME: unreadable WHAT after line N: REASON``, the error for
    a file that cannot be read to its end (a cut gzip, an I/O error).
    """
    if invalid_utf8 not in INVALID_UTF8_POLICIES:
        raise ValueError(f"invalid_utf8={invalid_utf8!r}; choose from {', '.join(INVALID_UTF8_POLICIES)}")
    warn = warn or log.warning
    if source == STDIN:  # the string "-", as a command line gives it; a Path is always a file
        stdin = sys.stdin.buffer
        if _pipe_or_terminal(stdin):
            pipe = _PipeLines(stdin)
            return LineReader(_decode(iter(pipe), "<stdin>", invalid_utf8, what, hint, warn), pipe)
        return LineReader(_decode(stdin, "<stdin>", invalid_utf8, what, hint, warn))
    handle = open_binary(Path(source))
    if isinstance(getattr(handle, "raw", None), io.FileIO) and _pipe_or_terminal(handle):  # not gzip
        pipe = _PipeLines(handle)
        return LineReader(_decode(iter(pipe), str(source), invalid_utf8, what, hint, warn, closing=handle), pipe)
    return LineReader(_decode(handle, str(source), invalid_utf8, what, hint, warn, closing=handle))


def read_line_chunks(
    source: Path | str,
    size: int,
    invalid_utf8: str = "error",
    *,
    what: str = "",
    hint: str = SKIP_HINT,
    warn: Callable[[str], None] | None = None,
) -> Iterator[list[str | None]]:
    """The lines ``read_lines`` gives, in lists of ``size`` (the last one shorter), with its
    errors and policies. A file's chunk of valid UTF-8 is decoded in one call rather than a
    line at a time (several times faster: what `mtkit prepare` reads)."""
    if invalid_utf8 not in INVALID_UTF8_POLICIES:
        raise ValueError(f"invalid_utf8={invalid_utf8!r}; choose from {', '.join(INVALID_UTF8_POLICIES)}")
    warn = warn or log.warning
    if source != STDIN:
        handle = open_binary(Path(source))
        if not (isinstance(getattr(handle, "raw", None), io.FileIO) and _pipe_or_terminal(handle)):
            return _decode_chunks(handle, str(source), size, invalid_utf8, what, hint, warn)
        handle.close()
    lines = read_lines(source, invalid_utf8, what=what, hint=hint, warn=warn)
    return iter(lambda: list(islice(lines, size)), [])


def _decode_chunks(
    handle: IO[bytes], label: str, size: int, invalid_utf8: str, what: str, hint: str, warn: Callable[[str], None]
) -> Iterator[list[str | None]]:
    done = 0  # lines in the chunks already yielded
    try:
        while raw := list(islice(handle, size)):
            yield _decode_chunk(raw, label, done, invalid_utf8, hint, warn)
            done += len(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:  # somewhere in the next chunk
        raise _unreadable(label, what, done, err) from None
    finally:
        handle.close()


def _decode_chunk(
    raw: list[bytes], label: str, done: int, invalid_utf8: str, hint: str, warn: Callable[[str], None]
) -> list[str | None]:
    """Lines ``done + 1``... of a file, each with its newline (but perhaps the last)."""
    try:
        text = b"".join(raw).decode("utf-8")
    except UnicodeDecodeError:  # find the line, and apply the policy to it, line by line
        return list(_decode(raw, label, invalid_utf8, "", hint, warn, first=done + 1))
    lines: list[str | None] = list(text.split("\n"))
    if raw[-1].endswith(b"\n"):
        lines.pop()  # the empty string after the last \n
    if "\r" in text:
        lines = [line.rstrip("\r") for line in cast(list[str], lines)]
    return lines


def _unreadable(label: str, what: str, number: int, err: BaseException) -> MtkitError:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    stream = f"{what} " if what else ""
    return MtkitError(f"{label}: unreadable {stream}after line {number}: {reason}")


def _decode(
    raw_lines: Iterable[bytes],
    label: str,
    invalid_utf8: str,
    what: str,
    hint: str,
    warn: Callable[[str], None],
    closing: IO[bytes] | None = None,
    first: int = 1,
) -> Iterator[str | None]:
    """Decode ``raw_lines`` (with or without their line endings, the first being line
    ``first``) under ``invalid_utf8``; ``closing`` is closed when the lines end."""
    number = first - 1
    try:
        for number, raw in enumerate(raw_lines, start=first):  # noqa: B007 - read after the loop
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if invalid_utf8 == "skip":
                    yield None
                    continue
                if invalid_utf8 == "error":
                    raise MtkitError(f"{label}:{number}: not valid UTF-8 (byte {err.start})"
                                     + (f"; {hint}" if hint else "")) from None
                warn(f"{label}:{number}: invalid UTF-8 (byte {err.start}) replaced with U+FFFD")
                line = raw.decode("utf-8", errors="replace")
            yield line.rstrip("\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise _unreadable(label, what, number, err) from None
    finally:
        if closing is not None:
            closing.close()
