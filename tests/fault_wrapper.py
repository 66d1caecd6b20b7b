"""Run the mtkit CLI with faults injected at exact points (tests only; library code stays clean).

    python tests/fault_wrapper.py FAULTS_JSON -- MTKIT_ARGS...

Each fault: ``{"target": "module:attr.path", "nth": N, "when": "before"|"after", "action": ...}``;
the fault fires at the N-th call of the target. Actions: SIGKILL, SIGINT, SIGTERM (sent to
this process), ENOSPC (raise OSError), FSIZE (from then on, writes past 4 KiB fail with EFBIG,
as on a full disk), READONLY:DIR (from then on, writing under DIR fails with EACCES: chmod when
not root, else the os functions refuse).

Only the standard library is imported before the faults are installed, so that every target
is patched before any mtkit module binds it.
"""

from __future__ import annotations

import builtins
import errno
import functools
import importlib
import io
import json
import os
import resource
import signal
import sys
from typing import Any


def _readonly(directory: str) -> None:
    directory = os.path.realpath(directory)
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(directory):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(directory, 0o555)
        return

    # root ignores file modes: make the os functions themselves refuse.
    def inside(path: Any) -> bool:
        try:
            path = os.fsdecode(path)
        except TypeError:
            return False
        path = os.path.realpath(path)
        return path == directory or path.startswith(directory + os.sep)

    def refuse(path: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open

    def guard_one(real: Any) -> Any:
        return lambda path, *a, **k: refuse(path) if inside(path) else real(path, *a, **k)

    def guard_two(real: Any) -> Any:
        return lambda src, dst, *a, **k: refuse(dst) if inside(src) or inside(dst) else real(src, dst, *a, **k)

    for name in ("mkdir", "unlink", "rmdir", "remove"):
        setattr(os, name, guard_one(getattr(os, name)))
    for name in ("replace", "rename", "symlink"):
        setattr(os, name, guard_two(getattr(os, name)))


def _fire(action: str) -> None:
    if action in ("SIGKILL", "SIGINT", "SIGTERM"):
        os.kill(os.getpid(), getattr(signal, action))
    elif action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "FSIZE":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif action.startswith("READONLY:"):
        _readonly(action.split(":", 1)[1])
    else:
        raise ValueError(action)


def _install(fault: dict[str, Any]) -> None:
    """Replace the target with a wrapper that counts its calls and fires at the N-th."""
    module, _, attr = fault["target"].partition(":")
    owner: Any = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        hit = calls[0] == fault["nth"]
        if hit and fault.get("when", "before") == "before":
            _fire(fault["action"])
        out = real(*args, **kwargs)
        if hit and fault.get("when") == "after":
            _fire(fault["action"])
        return out

    # A static method stays one, or calls through an instance would pass ``self``.
    static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def main(argv: list[str]) -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler; the SIGINT faults need the handler an interactive user has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faults = json.loads(argv[1])
    args = argv[argv.index("--") + 1 :]
    for fault in faults:
        _install(fault)
    sys.argv = ["mtkit", *args]
    from mtkit.cli import main as mtkit_main

    mtkit_main()


if __name__ == "__main__":
    main(sys.argv)
