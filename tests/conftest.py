"""Shared pytest fixtures. Each helper appends its own fixtures with distinctive names."""

import copy
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

# --------------------------------------------------------------------------- tokenizer / prepare

_TOKDATA_SYLLABLES = ["ka", "to", "ri", "mu", "se", "na", "lo", "pe", "shi"]
_TOKDATA_SYLLABLES += ["dra", "fen", "gul", "bor", "wix", "quo", "zat", "lem"]


def _tokdata_words(seed: int, n: int = 150) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_TOKDATA_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


_TOKDATA_SRC = _tokdata_words(1)
_TOKDATA_TGT = [w[::-1] + "en" for w in _tokdata_words(1)]


def tokdata_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct synthetic sentence pairs; the target is a word-by-word 'translation'."""
    rng = random.Random(seed)
    table = dict(zip(_TOKDATA_SRC, _TOKDATA_TGT, strict=True))
    pairs = []
    for i in range(n):
        words = [rng.choice(_TOKDATA_SRC) for _ in range(rng.randint(3, 12))]
        pairs.append((" ".join(words) + f" {i}", " ".join(table[w] for w in words) + f" {i}"))
    return pairs


@pytest.fixture
def tokdata_experiment(tmp_path: Path):
    """Factory: ``make(n=300, **sections) -> config path`` writes ``n`` synthetic pairs as
    train.src/train.tgt (and 20-pair valid/test files) under tmp_path and a config that reads
    them, with a tiny tokenizer; ``sections`` are merged over the defaults."""

    def make(n: int = 300, **sections) -> Path:
        files = {}
        for split, count, seed in (("train", n, 0), ("valid", 20, 1), ("test", 20, 2)):
            pairs = tokdata_pairs(count, seed)
            for side, k in (("src", 0), ("tgt", 1)):
                path = tmp_path / f"{split}.{side}"
                path.write_text("".join(p[k] + "\n" for p in pairs), encoding="utf-8")
                files[split, side] = str(path)
        config = {
            "experiment": {"dir": str(tmp_path / "run")},
            "data": {
                split: {"src": files[split, "src"], "tgt": files[split, "tgt"]} for split in ("train", "valid", "test")
            },
            "tokenizer": {"vocab_size": 120, "num_threads": 1},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    return make


# --------------------------------------------------------------------------- train / checkpoint

TRAINKIT_SECTIONS = {
    "model": {"size": "tiny", "dropout": 0.1},
    "train": {
        "max_tokens": 300, "max_steps": 8, "warmup_steps": 2, "lr": 0.003, "log_every": 2,
        "valid_every": 4, "valid_bleu": False, "best_metric": "loss", "keep_last": 2,
        "threads": 1,  # tiny matrices: more threads only contend (badly so on a busy machine)
        "precision": "fp32",  # exact comparisons (resume, DDP); auto is bf16 on CPUs with native bf16
    },
    "decode": {"beam": 1, "max_len_a": 1.2, "max_len_b": 3},
}


@pytest.fixture(scope="session")
def trainkit_prepared(tmp_path_factory) -> dict:
    """Made once per session: 300 synthetic pairs (20 valid), a 120-piece tokenizer and the
    prepared data under ``run/``. Returns the config as a dict."""
    from mtkit.config import validate_config
    from mtkit.data import prepare, training_text
    from mtkit.tokenizer import tokenizer_dir, train_tokenizers

    base = tmp_path_factory.mktemp("trainkit")
    data = {}
    for split, count, seed in (("train", 300, 0), ("valid", 20, 1)):
        pairs = tokdata_pairs(count, seed)
        files = {}
        for side, k in (("src", 0), ("tgt", 1)):
            files[side] = str(base / f"{split}.{side}")
            Path(files[side]).write_text("".join(p[k] + "\n" for p in pairs), encoding="utf-8")
        data[split] = files
    config = {"experiment": {"dir": str(base / "run")}, "data": data,
              "tokenizer": {"vocab_size": 120, "num_threads": 1}, **TRAINKIT_SECTIONS}
    cfg = validate_config(config)
    train_tokenizers(cfg.tokenizer, tokenizer_dir(cfg), lambda sides: training_text(cfg.data, sides))
    prepare(cfg)
    return config


@pytest.fixture
def trainkit_experiment(trainkit_prepared, tmp_path):
    """Factory: ``make(name="run", **sections) -> config path``: a copy of the prepared
    experiment in ``tmp_path/name`` and its config, ``sections`` merged over the defaults."""
    import copy
    import shutil

    def make(name: str = "run", **sections) -> Path:
        config = copy.deepcopy(trainkit_prepared)
        source = Path(config["experiment"]["dir"])
        target = tmp_path / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.jsonl"))
        config["experiment"]["dir"] = str(target)
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    return make


# --------------------------------------------------------------------------- faults (kill / disk / signal)

FAULTKIT_WRAPPER = r'''
"""Run the mtkit CLI with faults injected at exact points (tests only; library code stays clean).

argv: FAULTS_JSON -- mtkit arguments. Each fault: {"target": "module:attr.path", "nth": N,
"when": "before"|"after", "action": ...}; the fault fires at the N-th call of the target.
Actions: SIGKILL, SIGINT, SIGTERM (sent to this process), ENOSPC (raise OSError), FSIZE (from
now on, writes past 4 KiB fail with EFBIG, as on a full disk), READONLY:DIR (from now on,
writing under DIR fails with EACCES: chmod when not root, else the os functions refuse).
"""
import builtins, errno, functools, importlib, io, json, os, resource, signal, sys

# A shell starts background jobs with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler; the SIGINT faults need the handler an interactive user has.
signal.signal(signal.SIGINT, signal.default_int_handler)


def _readonly(directory):
    directory = os.path.realpath(directory)
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(directory):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(directory, 0o555)
        return

    def inside(path):
        try:
            path = os.fsdecode(path)
        except TypeError:
            return False
        path = os.path.realpath(path)
        return path == directory or path.startswith(directory + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open

    def guard_one(real):
        return lambda path, *a, **k: refuse(path) if inside(path) else real(path, *a, **k)

    def guard_two(real):
        return lambda src, dst, *a, **k: refuse(dst) if inside(src) or inside(dst) else real(src, dst, *a, **k)

    for name in ("mkdir", "unlink", "rmdir", "remove"):
        setattr(os, name, guard_one(getattr(os, name)))
    for name in ("replace", "rename", "symlink"):
        setattr(os, name, guard_two(getattr(os, name)))


def _fire(action):
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


def _install(fault):
    module, _, attr = fault["target"].partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == fault["nth"]
        if hit and fault.get("when", "before") == "before":
            _fire(fault["action"])
        out = real(*args, **kwargs)
        if hit and fault.get("when") == "after":
            _fire(fault["action"])
        return out

    setattr(owner, name, staticmethod(wrapper) if isinstance(owner, type) and isinstance(
        owner.__dict__.get(name), staticmethod) else wrapper)


faults = json.loads(sys.argv[1])
args = sys.argv[sys.argv.index("--") + 1:]
for fault in faults:
    _install(fault)
sys.argv = ["mtkit", *args]
from mtkit.cli import main
main()
'''


def faultkit_command(args: list[str], faults: list[dict] | None = None) -> list[str]:
    """The argv of ``mtkit ARGS`` in a fresh interpreter, with ``faults`` injected (see
    FAULTKIT_WRAPPER)."""
    import json
    import sys

    return [sys.executable, "-c", FAULTKIT_WRAPPER, json.dumps(faults or []), "--", *args]


def faultkit_env() -> dict:
    """One thread everywhere: tiny models gain nothing from more, and OpenMP threads spin."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


FAULTKIT_HANG_GUARD_S = 300  # a scenario that runs this long has hung


@dataclass
class FaultScenario:
    """One killed process: its command, where it ran, and (once finished) what it did."""

    config: Path
    args: list[str]
    faults: list[dict]
    returncode: int | None = None
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return Path(yaml.safe_load(self.config.read_text())["experiment"]["dir"])


def faultkit_experiment(prepared: dict, directory: Path, *, data: bool = True, **sections) -> Path:
    """A copy of the session's prepared tiny experiment (without its prepared data unless
    ``data``) in ``directory``, with ``sections`` merged over its config."""
    config = copy.deepcopy(prepared)
    ignore = ["checkpoints", "tensorboard", "*.jsonl"] + ([] if data else ["data"])
    shutil.copytree(config["experiment"]["dir"], directory / "run", ignore=shutil.ignore_patterns(*ignore))
    config["experiment"]["dir"] = str(directory / "run")
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def faultkit_fault(target: str, nth: int, when: str = "before", action: str = "SIGKILL") -> list[dict]:
    """``action`` at the ``nth`` call of ``target`` ("module:attr.path"), before or after it runs."""
    return [{"target": target, "nth": nth, "when": when, "action": action}]


def faultkit_launch(scenarios: dict[str, FaultScenario]) -> None:
    """Run every scenario at once (each in the directory of its config); record exit status
    (negative: killed by that signal; "hung" past the guard) and stderr."""
    running = {}
    for name, s in scenarios.items():
        log = open(s.config.parent / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(faultkit_command(s.args, s.faults), cwd=s.config.parent, env=faultkit_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        running[name] = (proc, log)
    for name, (proc, log) in running.items():
        try:
            scenarios[name].returncode = proc.wait(timeout=FAULTKIT_HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            scenarios[name].returncode = "hung"
        log.seek(0)
        scenarios[name].stderr = log.read()
        log.close()


def faultkit_random_checkpoint(prepared: dict, directory: Path) -> Path:
    """A run directory holding one checkpoint of a random tiny model (for translate)."""
    import torch

    from mtkit.checkpoint import save_checkpoint
    from mtkit.config import validate_config
    from mtkit.model import Transformer
    from mtkit.tokenizer import Tokenizers, tokenizer_dir

    config = validate_config({**prepared, "experiment": {"dir": str(directory / "model")}})
    tokenizers = Tokenizers.load(tokenizer_dir(validate_config(prepared)))
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    save_checkpoint(directory / "model" / "checkpoints", step=1, epoch=0, model=model, config=config,
                    tokenizers=tokenizers, metrics={}, trainer_state={}, best=True, keep_last=1)
    return directory / "model"
