"""Files: atomic writes (temporary name, then rename) and checked reading of text corpora.

A command that fails or is killed never leaves an output that looks complete: outputs are
written under a temporary name in the same directory and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mtkit.errors import MtkitError


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None
    _fsync_dir(path.parent)


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


def open_binary(path: Path):
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
    magic = handle.peek(2)[:2] if hasattr(handle, "peek") else b""
    if magic == b"\x1f\x8b":
        # Iterating a GzipFile runs Python code for every line; a BufferedReader over it does not.
        return io.BufferedReader(gzip.GzipFile(fileobj=handle, mode="rb"), 1 << 16)
    if path.suffix == ".gz":
        handle.close()
        raise MtkitError(f"{path}: not a gzip file (name ends in .gz)")
    return handle


def read_lines(path: Path, invalid_utf8: str = "error") -> Iterator[str | None]:
    """Yield the lines of a plain or gzip UTF-8 text file, without line endings.

    A line that is not UTF-8 raises a one-line MtkitError naming the file and line, or with
    ``invalid_utf8="skip"`` yields None in its place (so callers keep line alignment).
    """
    path = Path(path)
    handle = open_binary(path)
    number = 0
    try:
        with handle:
            for number, raw in enumerate(handle, start=1):  # noqa: B007
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if invalid_utf8 == "skip":
                        yield None
                        continue
                    raise MtkitError(
                        f"{path}:{number}: not valid UTF-8 (byte {err.start}); "
                        "set data.invalid_utf8=skip to skip such lines"
                    ) from None
                yield line.rstrip("\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise MtkitError(f"{path}: unreadable after line {number}: {reason}") from None
