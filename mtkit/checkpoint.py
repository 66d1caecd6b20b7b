"""Checkpoints: self-contained run directories that a kill at any moment cannot corrupt.

Layout under ``{experiment.dir}/checkpoints/``::

    step_00001000/
        model.safetensors   weights; tied/shared tensors stored once
        config.yaml         the resolved experiment config
        tokenizer/          the SentencePiece model(s) (``Tokenizers.copy_to``)
        meta.json           mtkit_version, step, epoch, tokenizer_fingerprint, vocab sizes,
                            metrics, and the byte size (to detect truncation) and checksum
                            (``mtkit.integrity``: verified before the weights or the training
                            state are read) of every file
        trainer_state.pt    optimizer, scaler, RNG states, data position, counters: plain
                            dicts/lists/tensors, read back with ``torch.load(weights_only=True)``
    last -> step_00001000   symlinks, each replaced atomically
    best -> step_00000800
    average/                ``mtkit pipeline``: the average of the newest step checkpoints
    final -> average        ``mtkit pipeline``: the model it chose (``mark_final``)

A checkpoint is written into a hidden temporary directory, fsynced and renamed into place;
only then are the ``last``/``best`` links swapped and old step directories pruned. So a
reader always sees either the previous complete checkpoint or the new complete one.

This module also owns a training run's side of the directory: refusing to start over an
existing run, resuming one (``resume_run``: cleaning up after a kill, checking that the
checkpoint fits the config, restoring weights, optimizer, scaler and random streams), and
what ``trainer_state.pt`` holds (``TrainState``, ``pack_trainer_state``, ``rng_state``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from mtkit import __version__
from mtkit.config import Config, save_config, validate_config
from mtkit.errors import ConfigError, MtkitError
from mtkit.fileio import atomic_dir, atomic_write_text, fsync_path, refuse_overlap, remove_stale_temporaries
from mtkit.integrity import file_checksum, verify_file, warn_unverified
from mtkit.models import Model, build_model
from mtkit.rundir import ExperimentDir

if TYPE_CHECKING:
    from mtkit.runtime import Runtime

FORMAT = "mtkit-checkpoint/1"
WEIGHTS, CONFIG, META, STATE, TOKENIZER = (
    "model.safetensors",
    "config.yaml",
    "meta.json",
    "trainer_state.pt",
    "tokenizer",
)
STEP_PREFIX = "step_"
PICK_ANOTHER = "pick another checkpoint (its run's checkpoints/ holds the others)"
"""What to do about a damaged checkpoint file."""
SAFE_TORCH = "2.6"
"""Before torch 2.6 a crafted file could run code through ``torch.load(weights_only=True)``."""


def checkpoints_dir(exp_dir: Path) -> Path:
    return ExperimentDir(exp_dir).checkpoints


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    root: Path,
    *,
    step: int,
    epoch: int,
    model: nn.Module,
    config: Config,
    tokenizers: Any,
    metrics: dict[str, float],
    trainer_state: dict[str, Any],
    best: bool,
    keep_last: int,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step_{step}`` atomically, point ``last`` (and ``best`` if ``best``) at it,
    and delete step directories beyond the newest ``keep_last`` (never best or last).

    ``model`` is the bare model (not a DDP or compiled wrapper). ``source``: where an imported
    model came from (meta.json's ``source``). Returns the directory.
    """
    final = root / step_name(step)
    if not _complete(final):
        with atomic_dir(final) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
            try:
                save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "mtkit": FORMAT})
            except SafetensorError as err:  # safetensors' writer reports I/O failures its own way
                raise OSError(errno.EIO, " ".join(str(err).split())) from None
            # Serialised in memory, written by Python: a full disk is then a plain OSError
            # (torch's own writer raises RuntimeError with a C++ message).
            buffer = io.BytesIO()
            torch.save(trainer_state, buffer)
            (tmp / STATE).write_bytes(buffer.getvalue())
            save_config(config, tmp / CONFIG)
            tokenizers.copy_to(tmp / TOKENIZER)
            meta = {
                "format": FORMAT,
                "mtkit_version": __version__,
                "step": step,
                "epoch": epoch,
                "tokenizer_fingerprint": tokenizers.fingerprint(),
                "src_vocab_size": tokenizers.src.vocab_size,
                "tgt_vocab_size": tokenizers.tgt.vocab_size,
                "metrics": metrics,
                **({"source": source} if source else {}),
                **_file_records(tmp, (WEIGHTS, STATE, CONFIG)),
            }
            for name in (WEIGHTS, STATE):
                fsync_path(tmp / name)
            # meta.json last: its presence (with matching sizes) marks a complete checkpoint.
            atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
    _point(root, "last", final.name)
    if best:
        _point(root, "best", final.name)
    _prune(root, keep_last)
    return final


def _file_records(directory: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """meta.json's ``files`` (byte sizes) and ``checksums`` of ``names`` in ``directory``."""
    return {"files": {name: (directory / name).stat().st_size for name in names},
            "checksums": {name: file_checksum(directory / name) for name in names}}


def _verify(directory: Path, name: str) -> None:
    """MtkitError unless ``directory/name`` matches the checksum its meta.json records (a
    checkpoint from before checksums: one warning line)."""
    checksums = _read_meta(directory).get("checksums")
    if checksums is None:
        warn_unverified(directory)
        return
    verify_file(directory / name, checksums.get(name), remedy=PICK_ANOTHER)


def _complete(directory: Path) -> bool:
    try:
        _read_meta(directory)
    except MtkitError:
        return False
    return True


def _point(root: Path, link: str, target: str) -> None:
    """Make ``root/link`` a relative symlink to ``target``, replacing any old one atomically."""
    tmp = root / f".{link}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / link)


def _prune(root: Path, keep_last: int) -> None:
    keep = {os.readlink(root / link) for link in ("last", "best", "final") if (root / link).is_symlink()}
    steps = sorted(p.name for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir())
    keep.update(steps[-keep_last:])
    for name in steps:
        if name not in keep:
            shutil.rmtree(root / name, ignore_errors=True)


def mark_final(root: Path, directory: Path) -> None:
    """Point ``root/final`` at ``directory`` (a checkpoint inside ``root``): the model that
    ``mtkit pipeline`` chose, which ``resolve`` prefers for a run directory."""
    _point(root, "final", Path(directory).name)


def clean_temporaries(root: Path) -> None:
    """Remove what a killed save left behind (hidden temporary directories and links)."""
    remove_stale_temporaries(root)


# --------------------------------------------------------------------------- reading


@dataclass
class Loaded:
    """A checkpoint ready to translate with: ``model`` is in eval mode on the requested device."""

    model: Model
    config: Config
    tokenizers: Any  # mtkit.tokenizer.Tokenizers
    meta: dict[str, Any]
    path: Path


def resolve(path: Path) -> Path:
    """The checkpoint directory that ``path`` names: a checkpoint directory itself, a
    ``checkpoints/`` directory, or a run directory (its ``final``, else ``best``, else ``last``)."""
    path = Path(path)
    if not path.exists():
        raise MtkitError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise MtkitError(f"{path}: not a checkpoint directory")
    if (path / META).exists() or (path / WEIGHTS).exists():
        return path
    for root in (checkpoints_dir(path), path):
        for link in ("final", "best", "last"):
            if (root / link).exists():
                target = (root / link).resolve()
                if target.parent != root.resolve():  # mtkit links only to its own step directories
                    raise MtkitError(f"{root / link}: points outside {root}; a run's links name its own checkpoints")
                return target
            if (root / link).is_symlink():
                raise MtkitError(f"{root / link}: points to a missing checkpoint")
    raise MtkitError(f"{path}: no checkpoint found (no checkpoints/final, best or last); run `mtkit train` first")


def refuse_links_out(directory: Path, within: Path | None = None) -> None:
    """MtkitError if ``directory``, or a link in it at any depth, leads out of ``within``
    (default: ``directory`` itself). A checkpoint or a run may come from anywhere (a download,
    a colleague): it is data, and must not make mtkit read, or copy on, a file elsewhere."""
    directory = Path(directory)
    root = Path(within or directory).resolve()
    top = directory.resolve()
    if not top.is_relative_to(root):
        raise MtkitError(f"{directory}: a link out of {within}; copy what it names into place instead")
    for parent, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            entry = Path(parent) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise MtkitError(f"{directory / entry.relative_to(top)}: a link out of {within or directory}; "
                                 "copy the file it names into place instead")


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META
    if not meta_path.is_file():
        if (directory / WEIGHTS).exists():
            raise MtkitError(f"{directory}: incomplete checkpoint (no {META})")
        raise MtkitError(f"{directory}: not an mtkit checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MtkitError(f"{meta_path}: unreadable or truncated ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MtkitError(f"{meta_path}: not an mtkit checkpoint (format is not {FORMAT})")
    checksums = meta.get("checksums", {})  # absent in checkpoints written before checksums
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise MtkitError(f"{meta_path}: malformed checksums; {PICK_ANOTHER}")
    for name, size in meta["files"].items():
        file = directory / name
        if not file.resolve().is_relative_to(directory.resolve()):  # meta.json is data: it names files inside
            raise MtkitError(f"{meta_path}: names a file outside the checkpoint ({name})")
        if not file.is_file():
            raise MtkitError(f"{file}: missing from the checkpoint; {PICK_ANOTHER}")
        found = file.stat().st_size
        if found != size:
            raise MtkitError(f"{file}: truncated or corrupt ({found} bytes, expected {size}); {PICK_ANOTHER}")
    return meta


def read_checkpoint_config(directory: Path) -> Config:
    """The resolved config stored in a checkpoint directory."""
    import yaml

    path = directory / CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return validate_config(data)
    except OSError as err:
        raise MtkitError(f"{path}: unreadable: {err.strerror}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise MtkitError(f"{path}: unreadable YAML: {problem}") from None
    except ConfigError as err:
        raise MtkitError(f"{path}: not a valid mtkit config: {err.problems[0]}") from None


def load_weights(model: nn.Module, directory: Path, device: str | torch.device = "cpu") -> None:
    """Load ``directory/model.safetensors`` into ``model`` (names and shapes must match),
    after verifying its checksum."""
    path = directory / WEIGHTS
    _verify(directory, WEIGHTS)
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise MtkitError(f"{path}: unreadable weights ({err})") from None
    except RuntimeError as err:
        first = str(err).splitlines()[-1].strip()
        raise MtkitError(f"{path}: weights do not fit this model: {first}") from None


def load_for_inference(path: Path, device: str = "cpu") -> Loaded:
    """Rebuild the model, config and tokenizers of a checkpoint (see ``resolve`` for ``path``)."""
    from mtkit.tokenizer import Tokenizers

    directory = resolve(path)
    refuse_links_out(directory)
    meta = _read_meta(directory)
    config = read_checkpoint_config(directory)
    tokenizers = Tokenizers.load(directory / TOKENIZER)
    if (tokenizers.src.vocab_size, tokenizers.tgt.vocab_size) != (meta["src_vocab_size"], meta["tgt_vocab_size"]):
        raise MtkitError(f"{directory / TOKENIZER}: vocabulary sizes differ from {directory / META}")
    model = build_model(config.model, meta["src_vocab_size"], meta["tgt_vocab_size"], tokenizers.shared_vocab)
    load_weights(model, directory)
    model.to(device).eval()
    return Loaded(model=model, config=config, tokenizers=tokenizers, meta=meta, path=directory)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """The training state saved beside the weights (plain data, no arbitrary pickles)."""
    if torch.__version__ < SAFE_TORCH:
        raise MtkitError(f"torch {torch.__version__} cannot read {STATE} safely (a crafted one can run code "
                         f"before torch {SAFE_TORCH}); upgrade: pip install 'torch>={SAFE_TORCH}'")
    _verify(directory, STATE)
    path = directory / STATE
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise MtkitError(f"{path}: unreadable training state ({type(err).__name__})") from None


def read_meta(directory: Path) -> dict[str, Any]:
    """Checked ``meta.json`` of a checkpoint directory (MtkitError if missing/truncated/foreign)."""
    return _read_meta(Path(directory))


def step_checkpoints(path: Path) -> list[Path]:
    """The step checkpoints of a run (or ``checkpoints/``) directory, oldest first."""
    root = checkpoints_dir(Path(path)) if (Path(path) / "checkpoints").is_dir() else Path(path)
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / META).is_file())


def average_checkpoints(directories: list[Path], out: Path) -> Path:
    """Write a checkpoint whose weights are the element-wise mean of ``directories``' weights
    (same model and tokenizer required); config, tokenizer and meta come from the newest one,
    but for ``metrics``, which stay empty (the newest one's scores are not the average's), and
    ``averaged_steps``. ``out`` must lie apart from every input (it is replaced whole).
    Averaging the last few checkpoints usually gains a little BLEU at no training cost."""
    from safetensors.torch import load_file, save_file

    if not directories:
        raise MtkitError("no checkpoints to average")
    refuse_overlap(out, directories, "the checkpoint")
    for directory in directories:
        refuse_links_out(directory)  # its config and tokenizer are copied into the average
    metas = [_read_meta(d) for d in directories]
    newest = max(range(len(directories)), key=lambda i: metas[i]["step"])
    fingerprints = {m["tokenizer_fingerprint"] for m in metas}
    if len(fingerprints) > 1:
        raise MtkitError(f"{', '.join(map(str, directories))}: checkpoints of different tokenizers cannot be averaged")
    total: dict[str, torch.Tensor] = {}
    for directory in directories:
        _verify(directory, WEIGHTS)
        path = directory / WEIGHTS
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise MtkitError(f"{path}: unreadable weights ({err})") from None
        if total and (weights.keys() != total.keys()
                      or any(weights[k].shape != total[k].shape for k in total)):
            raise MtkitError(f"{path}: weights differ in names or shapes from {directories[0] / WEIGHTS}")
        for name, tensor in weights.items():
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    source = directories[newest]
    averaged = {name: (tensor / len(directories)).to(torch.float32).contiguous() for name, tensor in total.items()}
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)
        try:
            save_file(averaged, str(tmp / WEIGHTS), metadata={"format": "pt", "mtkit": FORMAT})
        except SafetensorError as err:
            raise OSError(errno.EIO, " ".join(str(err).split())) from None
        shutil.copy2(source / CONFIG, tmp / CONFIG)
        shutil.copytree(source / TOKENIZER, tmp / TOKENIZER)
        meta = {**metas[newest], "metrics": {}, "averaged_steps": sorted(m["step"] for m in metas),
                "averaged_from": [str(d) for d in directories],
                **_file_records(tmp, (WEIGHTS, CONFIG))}
        atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- a training run's directory


@dataclass
class TrainState:
    """Counters saved in every checkpoint; ``epoch``/``batch_index`` locate the next batch."""

    step: int = 0
    epoch: int = 1
    batch_index: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    nonfinite_in_row: int = 0
    elapsed_s: float = 0.0
    last_saved_step: int = -1
    target_tokens: int = 0
    """Target tokens trained on, all ranks (0 in checkpoints written before it was counted)."""
    update_s: float = 0.0
    """Seconds spent in updates (batching, forward, backward, step), validation excluded."""


def refuse_existing_run(root: Path) -> None:
    """MtkitError if ``root`` (a ``checkpoints/`` directory) already holds a run's checkpoints."""
    if (root / "last").is_symlink() or any(root.glob(f"{STEP_PREFIX}*")):
        raise MtkitError(
            f"{root}: already holds checkpoints of a run; continue it with --resume, "
            "or remove the directory (or change experiment.dir) to start afresh"
        )


def pack_trainer_state(
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rngs: list[dict[str, Any]],
    raw_weights: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds: the counters, optimizer and scaler states, every
    rank's RNG states (``rng_state()``, in rank order) and, for a run that keeps a weight
    average (saved as the checkpoint's weights), the raw weights training continues from."""
    packed: dict[str, Any] = {
        "state": asdict(state),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
        "world_size": len(rngs),
    }
    if raw_weights is not None:
        packed["model_weights"] = raw_weights
    return packed


def resume_run(
    root: Path,
    config: Config,
    tokenizers: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Continue the run in ``root`` from ``last``: weights into ``model``, optimizer and
    scaler states, this rank's random streams. Returns the training state and, for a run that
    kept a weight average, the raw weights to continue from (``model`` then holds the average)."""
    if not (root / "last").exists():
        raise MtkitError(f"{root}: no checkpoint to resume from (no checkpoints/last); start without --resume")
    clean_temporaries(root)
    directory = (root / "last").resolve()
    # A run killed after writing a step directory but before moving `last` left a newer step
    # behind; this run will write that step itself, so the stale one must go.
    for stale in root.glob(f"{STEP_PREFIX}*"):
        if stale.is_dir() and stale.name > directory.name:
            shutil.rmtree(stale, ignore_errors=True)
    check_compatible(directory, config, tokenizers)
    frozen = read_checkpoint_config(directory).pretrained.freeze
    if sorted(frozen) != sorted(config.pretrained.freeze):
        # The optimizer's state covers the parameters that train: another set cannot take it.
        raise MtkitError(f"{directory}: the run froze [{', '.join(frozen)}]; resume it with "
                         f"pretrained.freeze [{', '.join(frozen)}], not [{', '.join(config.pretrained.freeze)}]")
    _warn_if_batches_change(directory, config)
    (root / "final").unlink(missing_ok=True)  # the pipeline's choice is stale once training goes on
    saved = load_trainer_state(directory)
    load_weights(model, directory, runtime.device)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["state"])
    rngs = saved["rng"]
    if len(rngs) == runtime.world:
        set_rng_state(rngs[runtime.rank])
    else:  # a different number of ranks cannot replay the same dropout masks
        warnings.warn(f"resuming {len(rngs)}-process training with {runtime.world}; random streams restart",
                      stacklevel=1)
        torch.manual_seed(dropout_seed(config.experiment.seed, runtime.rank, state.step))
    return state, saved.get("model_weights")


def _warn_if_batches_change(directory: Path, config: Config) -> None:
    """A resumed run continues the data position of the checkpoint; with another batch size or
    seed the batch order is another one, so it will not equal an uninterrupted run. That is
    allowed (the out-of-memory message itself suggests a smaller train.max_tokens), but said."""
    saved = read_checkpoint_config(directory)
    changed = [f"{key}={old} -> {new}" for key, old, new in (
        ("train.max_tokens", saved.train.max_tokens, config.train.max_tokens),
        ("train.update_freq", saved.train.update_freq, config.train.update_freq),
        ("experiment.seed", saved.experiment.seed, config.experiment.seed),
    ) if old != new]
    if changed:
        warnings.warn(f"resuming with {', '.join(changed)}: the batches differ from the checkpoint's run, "
                      "so this run will not equal an uninterrupted one", stacklevel=1)


FREE_MODEL_KEYS = ("dropout", "attention_dropout", "activation_dropout")
"""The ``model`` keys a fine-tuning config may set: the rest is the pretrained model's."""


def pretrained_checkpoint(config: Config) -> Path | None:
    """The checkpoint fine-tuning starts from: ``pretrained.run`` (see ``resolve``), or the
    import of ``pretrained.huggingface`` in the experiment directory; None without either."""
    pretrained = config.pretrained
    if pretrained.run is not None:
        directory = resolve(pretrained.run)
    elif pretrained.huggingface is not None:
        run = ExperimentDir(config.experiment.dir).pretrained
        if not run.exists():
            raise MtkitError(f"{run}: pretrained.huggingface {pretrained.huggingface} is not imported yet; run "
                             f"`mtkit pipeline -c CONFIG`, or `mtkit import huggingface {pretrained.huggingface} "
                             f"-o {run}`")
        directory = resolve(run)
    else:
        return None
    refuse_links_out(directory)  # its config, tokenizer and weights become this experiment's
    return directory


def finetuned_config(config: Config) -> Config:
    """The config a fine-tuning run trains under: ``model`` is the pretrained checkpoint's,
    with the dropouts that ``config.model`` gives. Any other key ``config.model`` gives must
    equal the pretrained model's (MtkitError naming the first that does not). Without a
    pretrained model, ``config`` itself."""
    directory = pretrained_checkpoint(config)
    if directory is None:
        return config
    pretrained = read_checkpoint_config(directory).model
    for key in sorted(config.model_keys_given - set(FREE_MODEL_KEYS)):
        mine, theirs = getattr(config.model, key), getattr(pretrained, key)
        if mine != theirs:
            raise MtkitError(f"model.{key}: {mine} differs from the pretrained model's {theirs} ({directory}); "
                             f"fine-tuning keeps its model, and model may set only {', '.join(FREE_MODEL_KEYS)}")
    model = {**pretrained.model_dump(mode="json"),
             **{key: getattr(config.model, key) for key in FREE_MODEL_KEYS if key in config.model_keys_given}}
    return validate_config({**config.to_dict(), "model": model})


def init_weights_from(path: Path, model: nn.Module, config: Config, tokenizers: Any, device: torch.device) -> None:
    """Fine-tuning: weights only, from a checkpoint (see ``resolve``) with the same model
    shape and tokenizer."""
    directory = resolve(path)
    refuse_links_out(directory)
    check_compatible(directory, config, tokenizers)
    load_weights(model, directory, device)


def check_compatible(directory: Path, config: Config, tokenizers: Any) -> None:
    """MtkitError unless the checkpoint in ``directory`` was trained with ``tokenizers`` and
    has the model shape of ``config`` (dropout may differ)."""
    meta = read_meta(directory)
    saved = read_checkpoint_config(directory)
    if meta["tokenizer_fingerprint"] != tokenizers.fingerprint():
        hint = ("; fine-tuning uses the pretrained model's: run `mtkit tokenizer train -c CONFIG` (which copies it) "
                "and `mtkit prepare -c CONFIG`" if config.pretrained.given else "")
        raise MtkitError(f"{directory}: checkpoint was trained with a different tokenizer than this experiment's{hint}")
    changed = [k for k, v in config.model.model_dump().items() if saved.model.model_dump()[k] != v]
    # Dropout may change between runs; the shape of the network may not.
    changed = [k for k in changed if "dropout" not in k]
    if changed:
        raise MtkitError(f"{directory}: checkpoint model differs from the config in model.{', model.'.join(changed)}")


def dropout_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's training stream (dropout masks), from the experiment's seed.
    Hashed rather than ``seed + rank``: the weights are initialised from ``seed`` itself, and
    rank 0's first masks would otherwise replay the very numbers that drew them."""
    digest = hashlib.blake2b(f"{seed}:dropout:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative int64


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (no pickled objects)."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(saved: dict[str, Any]) -> None:
    """Restore what ``rng_state()`` captured."""
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
