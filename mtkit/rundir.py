"""The experiment directory: where each stage writes, and the lock that gives it one writer.

Layout of ``experiment.dir`` (every path below comes from ``ExperimentDir``)::

    .lock                 held by the command writing the directory; names its pid and command
    config.yaml           the resolved config of the last ``mtkit pipeline``
    pretrained/           ``mtkit pipeline``: the imported ``pretrained.huggingface`` model (a run)
    tokenizer/            ``mtkit tokenizer train``: the SentencePiece model(s)
    data/                 ``mtkit prepare``: the encoded splits, report.json, report.txt
    checkpoints/          ``mtkit train``: step_*/, last, best (see ``mtkit.checkpoint``)
    train_log.jsonl       ``mtkit train``: one JSON row per log interval and per validation
    tensorboard/          ``mtkit train``: TensorBoard scalars
    stages/               ``mtkit pipeline``: {stage}.json when a stage is done, {stage}.started.json
    selection.json        ``mtkit pipeline``: which model it chose as final (best, last or an average) and why
    translations/         ``mtkit pipeline``: test.hyp.{lang}, test.ref.{lang}
    report.json, report.md, training.png   ``mtkit pipeline``: the scored result

The lock: ``mtkit tokenizer train``, ``prepare``, ``train`` and ``pipeline`` hold ``EXP/.lock``
(``fcntl.flock``, exclusive) while they run, so a second writer started on the same directory
stops at once with one line naming the holder. The kernel drops a flock when its holder exits,
however it exits, so a lock file left by a killed process never blocks. The commands take it
(``mtkit.cli``), not the library functions; it is reentrant within a process, so a caller that
holds it may run the stages in-process. Under torchrun only rank 0 (``RANK``) takes it. Where
there is no ``fcntl`` (Windows) there is no lock.

No torch here: the CLI reads the layout and takes the lock before importing anything heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtkit.errors import MtkitError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ExperimentDir:
    """The paths of one experiment directory ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pretrained(self) -> Path:
        """``mtkit pipeline``: the run ``pretrained.huggingface`` is imported into."""
        return self.root / "pretrained"

    @property
    def backtranslation(self) -> Path:
        """``mtkit pipeline``: the synthetic pairs of its ``backtranslate`` stage."""
        return self.root / "backtranslation"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_report(self) -> Path:
        return self.data / "report.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stamp(self, stage: str, suffix: str = "") -> Path:
        """The pipeline's stamp of ``stage`` (``suffix`` ``.started`` while it runs)."""
        return self.stages / f"{stage}{suffix}.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def translations(self) -> Path:
        return self.root / "translations"

    def test_hypotheses(self, lang: str) -> Path:
        return self.translations / f"test.hyp.{lang}"

    def test_references(self, lang: str) -> Path:
        return self.translations / f"test.ref.{lang}"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plot(self) -> Path:
        return self.root / "training.png"

    def checkpoint_link(self, name: str) -> Path:
        """``checkpoints/best`` or ``checkpoints/last``."""
        return self.checkpoints / name


# --------------------------------------------------------------------------- the lock

# Locks this process holds: resolved experiment directory -> [open lock file, depth].
_held: dict[Path, list] = {}


@contextlib.contextmanager
def exclusive(exp_dir: Path, command: str | None = None) -> Iterator[None]:
    """Hold the experiment directory's lock for the ``with`` body (creating the directory).
    A body that fails leaves no directory it created that holds nothing but the lock.

    MtkitError at once, naming the holder's pid and command, if another process holds it.
    Reentrant: a nested ``exclusive`` of the same directory in this process just passes.
    ``command`` is what the lock file records (default: this process's ``mtkit`` command line).
    No-op under torchrun on ranks other than 0, and where ``fcntl`` does not exist.
    """
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    exp = ExperimentDir(exp_dir)
    created = _missing(exp.root)
    try:
        exp.root.mkdir(parents=True, exist_ok=True)
        key = exp.root.resolve()
    except OSError as err:
        raise MtkitError(f"{err.filename or exp.root}: cannot create the directory: {err.strerror}") from None
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    handle = _acquire(exp.lock_file, command or _command_line())
    _held[key] = [handle, 1]
    failed = True
    try:
        yield
        failed = False
    finally:
        del _held[key]
        _release(handle)
        if failed:
            _remove_unused(exp, created)


def _missing(directory: Path) -> list[Path]:
    """``directory`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (directory, *directory.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_unused(exp: ExperimentDir, created: list[Path]) -> None:
    """Undo the directories a failed command created (``_missing``) while they hold nothing but
    the released lock; anything else there is not ours to remove."""
    with contextlib.suppress(OSError):
        if created and [*exp.root.iterdir()] == [exp.lock_file] and exp.lock_file.stat().st_size == 0:
            exp.lock_file.unlink()
        for path in created:
            path.rmdir()


def _acquire(path: Path, command: str):
    assert fcntl is not None
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until _release)
    except OSError as err:
        raise MtkitError(f"{path}: cannot open the lock file: {err.strerror}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = _describe(handle.read())
        handle.close()
        raise MtkitError(
            f"{path.parent}: in use by {holder}; wait for it to finish, or stop it, and run this again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "command": command}) + "\n")
    handle.flush()
    return handle


def _release(handle) -> None:
    assert fcntl is not None
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()  # the holder is gone: nothing to name
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


def _describe(text: str) -> str:
    """``pid N (COMMAND)`` from a lock file's content; the holder may not have written it yet."""
    try:
        holder = json.loads(text)
        return f"pid {int(holder['pid'])} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "another mtkit process"


def _command_line() -> str:
    return shlex.join(["mtkit", *sys.argv[1:]])
