"""Checksums of the files mtkit writes and later reads back: prepared splits (``data/report.json``),
checkpoint weights and training state (``meta.json``) and converted CTranslate2 models (their
completion marker).

A checksum is the string ``xxh3-128:<32 hex digits>``. XXH3 hashes at memory speed (about
20 GB/s on one core, against 0.7 GB/s for blake2b and 1.6 GB/s for sha256), so verifying a
file costs about as much as reading it once; it guards against accidental damage (a flipped
bit, a truncated copy), not against someone forging a file. Files are verified before any
parser (pyarrow, safetensors, CTranslate2) touches their bytes, so a damaged file is a one-line
error and never a crash inside a native library.

A file written before mtkit recorded checksums has none: it is read unverified, after one
warning line (``warn_unverified``, once per process for a file or a directory of them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import xxhash

from mtkit.errors import MtkitError

log = logging.getLogger(__name__)

ALGORITHM = "xxh3-128"
_BLOCK = 8 << 20  # large reads: the hash outruns small ones
_warned: set[Path] = set()


def file_checksum(path: Path) -> str:
    """The checksum of the bytes of ``path`` (OSError if it cannot be read)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return f"{ALGORITHM}:{digest.hexdigest()}"


def damage(path: Path, size: int | None, checksum: str) -> str | None:
    """What is wrong with ``path`` against its recorded ``size`` (None: not recorded) and
    ``checksum``, in words (``missing``, ``truncated (N bytes, expected M)``, ``corrupt
    (checksum mismatch)``); None when it is intact."""
    try:
        found = path.stat().st_size
    except OSError:
        return "missing"
    if size is not None and found != size:
        return f"truncated or corrupt ({found} bytes, expected {size})"
    algorithm = checksum.partition(":")[0]
    if algorithm != ALGORITHM:
        return f"checksum of an unknown kind '{algorithm}' (written by a newer mtkit?)"
    try:
        actual = file_checksum(path)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None if actual == checksum else "corrupt (checksum mismatch)"


def verify_file(path: Path, checksum: str | None, *, size: int | None = None, remedy: str) -> None:
    """MtkitError ``PATH: <damage>; REMEDY`` unless ``path`` matches its recorded ``checksum``
    (and ``size``, when given). ``checksum`` None (a file from before checksums): one warning
    line, once per file in this process, and the file is read unverified."""
    path = Path(path)
    if checksum is None:
        warn_unverified(path)
        return
    problem = damage(path, size, checksum)
    if problem is not None:
        raise MtkitError(f"{path}: {problem}; {remedy}")


def warn_unverified(path: Path) -> None:
    """Say once per process that ``path`` (a file, or a directory of files) has no checksum
    and is read without verifying it."""
    if path not in _warned:
        _warned.add(path)
        log.warning(f"{path}: no checksums (written by an older mtkit); read without verifying them")
