"""The whole job in order: tokenizer -> prepare -> train -> select -> translate -> score -> report.

Fine-tuning a Hugging Face model (``pretrained.huggingface``) adds a first stage, ``import``,
into ``{dir}/pretrained``; then the tokenizer stage copies its tokenizer, and training starts
from its model and weights (``pretrained.run`` does the same for an mtkit run, without import).
A ``backtranslation`` section adds a ``backtranslate`` stage before the tokenizer: a reverse run
translates target-language text into ``{dir}/backtranslation``, and the stages after it see
those synthetic pairs as the last corpus of ``data.train`` (``with_backtranslation``).

``select`` chooses the final model: the best of the ``best`` and ``last`` checkpoints and the
average of the newest ``train.average_last`` step checkpoints, by ``train.best_metric`` on the
whole validation set; ``checkpoints/final`` points at it and ``selection.json`` says why.

Each stage, when it finishes, writes a stamp ``{dir}/stages/{stage}.json`` (every path in the
experiment directory comes from ``mtkit.rundir.ExperimentDir``) holding its key: a hash of
what its outputs depend on and of nothing else. That is the config keys that change them (not
threads, devices, logging, chunk sizes or process counts), its input files (size and mtime),
and the content of the earlier stages' outputs that it reads: the tokenizer's fingerprint,
the rows of the prepared splits, the checkpoints. A stage whose key matches is skipped, so
re-running after a crash or an edit does only what is needed; a stage after one that ran runs
only if what it reads changed (a new test split re-runs translate and score, not training).

Training's key leaves out its budget (``train.max_steps``, ``max_epochs``, ``max_minutes``),
which the stamp records apart: a larger budget resumes the finished run from its last
checkpoint, as an interrupted run resumes. A run that the config no longer describes (other
weights, or a run gone past a smaller budget), or that ``--from train`` replaces, is moved
aside to ``checkpoints.{key}/`` with its logs, never deleted.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkit.config import Config, CorpusConfig, save_config
from mtkit.corpus import corpus_files
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_bytes, atomic_write_text
from mtkit.rundir import ExperimentDir

STAGES = ("import", "backtranslate", "tokenizer", "prepare", "train", "select", "translate", "score")


@dataclass
class Attempt:
    """A stage about to run, and what the pipeline knows of the outputs it finds there."""

    stage: str
    key: str
    """The stage's key under this config."""
    previous: str | None
    """The key its stamps give the outputs there now (the last attempt's); None without a stamp
    of this mtkit."""
    stamped: bool
    """Whether the pipeline made those outputs (a stamp of any mtkit exists)."""
    interrupted: bool
    """Whether the last attempt began and did not finish."""
    forced: bool
    """``--from`` named this stage or an earlier one: start afresh."""
    log: Callable[[str], None]
    command: str
    """The command that continues this pipeline, for the line that ends an interrupted run."""
    resume: bool = False
    """Set by the stage's ``decide``: continue the outputs there rather than start afresh."""

    def say(self, words: str) -> None:
        self.log(f"pipeline: {self.stage}: {words}")


def _start_afresh(config: Config, attempt: Attempt) -> bool:
    attempt.say("running")
    return False


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]
    """Config sections (or ``section.key``) whose values change the stage's outputs."""
    run: Callable[[Config, Attempt], None]
    reads: Callable[[Config], dict[str, Any]] = lambda config: {}
    """What else the outputs follow, by name: input files (size and mtime) and the content of
    the earlier stages' outputs the stage reads (fingerprints)."""
    readable: Callable[[Config], bool] = lambda config: True
    """Whether the stage's outputs are there and fit for this mtkit and config (not removed,
    not in an older format, a tokenizer of the configured normalisation). When not, the stage
    runs again though its key matches; the stages after it follow what it makes."""
    ignores: tuple[str, ...] = ()
    """Keys inside ``sections`` that do not change the outputs (threads, devices, logging)."""
    budget: Callable[[Config], dict[str, Any]] = lambda config: {}
    """Keys left out of the key that bound the stage's work rather than change it (training's
    ``max_steps``, ...): the stamp records them; a change runs the stage again, which may
    continue its outputs."""
    decide: Callable[[Config, Attempt], bool] = _start_afresh
    """Called before the stage runs: deals with the outputs there, says in one line what the
    stage will do and whether it continues them (``Attempt.resume``)."""
    applies: Callable[[Config], bool] = lambda config: True
    """Whether the config has this stage at all (``import``: only with ``pretrained.huggingface``)."""
    view: Callable[[Config], Config] = lambda config: config
    """The config as the stage's outputs follow it (training's: with a pretrained model's
    description in ``model``, ``mtkit.checkpoint.finetuned_config``)."""


def _run_import(config: Config, attempt: Attempt) -> None:
    from mtkit.huggingface import import_huggingface

    pretrained = config.pretrained
    assert pretrained.huggingface is not None
    import_huggingface(pretrained.huggingface, ExperimentDir(config.experiment.dir).pretrained,
                       revision=pretrained.revision, force=True, log=attempt.say)


def _decide_import(config: Config, attempt: Attempt) -> bool:
    """Replace only an import the pipeline made: a run put there by hand is not ours to delete."""
    target = ExperimentDir(config.experiment.dir).pretrained
    if target.exists() and not attempt.stamped:
        raise MtkitError(f"{target}: holds a model that no pipeline imported; move it away, or name it in "
                         "pretrained.run instead of pretrained.huggingface")
    attempt.say(f"importing {config.pretrained.huggingface}")
    return False


def _import_readable(config: Config) -> bool:
    return ExperimentDir(config.experiment.dir).pretrained.joinpath("checkpoints", "final").exists()


def _import_reads(config: Config) -> dict[str, Any]:
    """A local model directory's files (size and mtime); a hub model is its id and revision."""
    source = Path(config.pretrained.huggingface or "")
    return {"files": _files(sorted(source.iterdir()))} if source.is_dir() else {}


def with_backtranslation(config: Config) -> Config:
    """``config`` as the stages after ``backtranslate`` see it: the synthetic corpus listed last
    in ``data.train`` (with ``backtranslation.weight``), and the tag among the tokenizer's
    symbols. The config itself when it back-translates nothing."""
    bt = config.backtranslation
    if bt.model is None:
        return config
    data = config.data
    out = ExperimentDir(config.experiment.dir).backtranslation
    synthetic = CorpusConfig(format="text", src=out / f"synthetic.{data.src_lang}",
                             tgt=out / f"synthetic.{data.tgt_lang}", weight=bt.weight)
    tokenizer = config.tokenizer
    if bt.tag is not None and bt.tag not in tokenizer.user_symbols:
        tokenizer = tokenizer.model_copy(update={"user_symbols": [*tokenizer.user_symbols, bt.tag]})
    return config.model_copy(update={"data": data.model_copy(update={"train": [*data.train, synthetic]}),
                                     "tokenizer": tokenizer})


def _run_backtranslate(config: Config, attempt: Attempt) -> None:
    from mtkit.backtranslate import Filters, Settings, backtranslate
    from mtkit.checkpoint import load_for_inference

    bt = config.backtranslation
    assert bt.model is not None and bt.monolingual is not None
    loaded = load_for_inference(bt.model, device=_device(config))
    sampling = {key: getattr(bt, key) for key in ("top_k", "top_p", "temperature") if getattr(bt, key) is not None}
    decode = loaded.config.decode.model_copy(update=sampling)
    settings = Settings(method=bt.method, filters=Filters(max_ratio=bt.max_ratio), tag=bt.tag,
                        seed=config.experiment.seed)
    # An attempt of these settings that was cut short continues; the outputs of others are ours
    # to replace (the stage made them).
    restart = attempt.previous != attempt.key
    backtranslate(loaded, bt.monolingual, ExperimentDir(config.experiment.dir).backtranslation, settings, decode,
                  device=_device(config), threads=config.train.threads, restart=restart,
                  src_lang=config.data.tgt_lang, tgt_lang=config.data.src_lang, say=attempt.say,
                  warn=lambda message: attempt.say(f"warning: {message}"))


def _backtranslate_reads(config: Config) -> dict[str, Any]:
    """The reverse model's checkpoint (its meta.json's hash) and the monolingual text."""
    from mtkit.checkpoint import META, resolve

    bt = config.backtranslation
    try:
        model = _file_digest(resolve(Path(bt.model or "")) / META)
    except MtkitError:
        model = None
    return {"model": model, "files": _files([Path(bt.monolingual or "")])}


def _backtranslate_readable(config: Config) -> bool:
    return (ExperimentDir(config.experiment.dir).backtranslation / "report.json").is_file()


def _run_tokenizer(config: Config, attempt: Attempt) -> None:
    from mtkit.data import train_tokenizer

    train_tokenizer(config)


def _tokenizer_readable(config: Config) -> bool:
    """A tokenizer trained with another normalisation than the config's is never reused, nor
    one other than the pretrained model's when fine-tuning."""
    from mtkit.tokenizer import tokenizer_dir, trained_normalization

    try:
        if config.pretrained.given:
            fingerprint = _tokenizer_fingerprint(config)
            return fingerprint is not None and fingerprint == _pretrained_reads(config)["pretrained_tokenizer"]
        return trained_normalization(tokenizer_dir(config)) == config.tokenizer.normalization
    except MtkitError:
        return False


def _finetuned(config: Config) -> Config:
    from mtkit.checkpoint import finetuned_config

    return finetuned_config(config) if config.pretrained.given else config


def _run_prepare(config: Config, attempt: Attempt) -> None:
    from mtkit.data import prepare

    prepare(config)


def _data_readable(config: Config) -> bool:
    from mtkit.data import prepared_fingerprint

    try:
        prepared_fingerprint(config.experiment.dir)
    except MtkitError:
        return False
    return True


def _run_train(config: Config, attempt: Attempt) -> None:
    from mtkit.train import train

    result = train(config, resume=attempt.resume)
    if result.interrupted:
        # Not done: no stamp, so that running the pipeline again resumes this run.
        raise result.stopped(f"resume with `{attempt.command}`")


def _run_select(config: Config, attempt: Attempt) -> None:
    select_final_model(config)


def _run_translate(config: Config, attempt: Attempt) -> None:
    translate_test_set(config)


def _run_score(config: Config, attempt: Attempt) -> None:
    write_report(config)


# --------------------------------------------------------------------------- what each stage reads


def _files(paths: list[Path]) -> list[list]:
    """Each input file's path, size and mtime (None for a missing file)."""
    files = []
    for path in paths:
        try:
            stat = Path(path).stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    return files


def _tokenizer_fingerprint(config: Config) -> str | None:
    from mtkit.tokenizer import read_meta, tokenizer_dir

    try:
        return str(read_meta(tokenizer_dir(config))["fingerprint"])
    except (MtkitError, KeyError):
        return None


def _split_digest(config: Config, split: str) -> str | None:
    """A hash of the rows of a prepared split, not of its file's bytes (where the record batches
    split follows ``data.chunk_size``); None when the split is missing or unreadable."""
    import pyarrow as pa

    from mtkit.data import data_dir, split_file

    streams: dict[str, Any] = {}
    try:
        with pa.memory_map(str(split_file(data_dir(config.experiment.dir), split))) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                for name, column in zip(batch.schema.names, batch.columns, strict=True):
                    _feed(streams, name, column)
    except (OSError, pa.ArrowException):
        return None
    return hashlib.sha256("".join(f"{n}:{h.hexdigest()}" for n, h in sorted(streams.items())).encode()).hexdigest()


def _feed(streams: dict[str, Any], name: str, column: Any) -> None:
    """Add a column's values, and the length of each row of a string or list column, each to a
    hash of its own: fed in pieces, a hash equals the hash of the whole."""
    import numpy as np
    import pyarrow as pa

    def stream(part: str) -> Any:
        return streams.setdefault(f"{name}.{part}", hashlib.sha256())

    if pa.types.is_list(column.type):
        stream("lengths").update(np.diff(column.offsets.to_numpy()).tobytes())
        stream("values").update(column.flatten().to_numpy().tobytes())
    elif pa.types.is_string(column.type):
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
        stream("lengths").update(np.diff(offsets).tobytes())
        stream("values").update(memoryview(column.buffers()[2])[offsets[0] : offsets[-1]])
    else:
        stream("values").update(column.to_numpy().tobytes())


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _checkpoints_read(exp: ExperimentDir, links: tuple[str, ...]) -> dict[str, list]:
    """The checkpoint each link names and a hash of its meta.json (its step, metrics and sizes)."""
    from mtkit.checkpoint import META

    return {link: [exp.checkpoint_link(link).resolve().name, _file_digest(exp.checkpoint_link(link) / META)]
            for link in links if exp.checkpoint_link(link).exists()}


def _pretrained_reads(config: Config) -> dict[str, Any]:
    """The pretrained checkpoint a fine-tuning experiment starts from: its meta.json's hash
    (weights, config and their checksums) and its tokenizer's fingerprint; nothing without one
    (so that the keys of other experiments stay as they were)."""
    from mtkit.checkpoint import META, TOKENIZER, pretrained_checkpoint
    from mtkit.tokenizer import read_meta

    try:
        directory = pretrained_checkpoint(config)
    except MtkitError:
        return {"pretrained": None, "pretrained_tokenizer": None}
    if directory is None:
        return {}
    try:
        fingerprint = str(read_meta(directory / TOKENIZER)["fingerprint"])
    except (MtkitError, KeyError):
        fingerprint = None
    return {"pretrained": _file_digest(directory / META), "pretrained_tokenizer": fingerprint}


def _tokenizer_reads(config: Config) -> dict[str, Any]:
    pretrained = _pretrained_reads(config)
    if pretrained:  # the copy follows the pretrained tokenizer, not the training text
        return {"pretrained_tokenizer": pretrained["pretrained_tokenizer"]}
    return {"files": _files(corpus_files(config.data.train))}


def _prepare_reads(config: Config) -> dict[str, Any]:
    return {"tokenizer": _tokenizer_fingerprint(config),
            "files": _files(corpus_files([*config.data.train, *_eval_corpora(config)]))}


def _eval_corpora(config: Config) -> list[CorpusConfig | None]:
    """The valid and test corpora, as the stage hashes have always listed them (one each)."""
    corpora: list[CorpusConfig | None] = []
    for split in ("valid", "test"):
        sets = config.data.eval_sets(split)
        corpora += sets if sets else [None]
    return corpora


def _train_reads(config: Config) -> dict[str, Any]:
    pretrained = _pretrained_reads(config)
    return {"tokenizer": _tokenizer_fingerprint(config), "train": _split_digest(config, "train"),
            "valid": _split_digest(config, "valid"), **({"pretrained": pretrained["pretrained"]} if pretrained else {}),
            **_mix(config)}


def _mix(config: Config) -> dict[str, Any]:
    """How training draws its corpora (``data.train.N.weight``, ``data.temperature``), where
    that is not each pair once (nothing then, as before these keys existed)."""
    weights, temperature = [corpus.weight for corpus in config.data.train], config.data.temperature
    if all(weight == 1.0 for weight in weights) and temperature == 1.0:
        return {}
    return {"mix": {"weights": weights, "temperature": temperature}}


def _select_reads(config: Config) -> dict[str, Any]:
    exp = ExperimentDir(config.experiment.dir)
    return {"checkpoints": _checkpoints_read(exp, ("last", "best")), "valid": _split_digest(config, "valid")}


def _translate_reads(config: Config) -> dict[str, Any]:
    exp = ExperimentDir(config.experiment.dir)
    return {"final": _checkpoints_read(exp, ("final",)), "test": _split_digest(config, "test")}


def _score_reads(config: Config) -> dict[str, Any]:
    """Everything the report shows: the scored translations, the data's counts, the model."""
    exp, lang = ExperimentDir(config.experiment.dir), config.data.tgt_lang
    return {"checkpoints": _checkpoints_read(exp, ("last", "final")),
            "data": _read_stamp(exp.data_report).get("splits"),
            **{name: _file_digest(path) for name, path in (
                ("hypotheses", exp.test_hypotheses(lang)), ("references", exp.test_references(lang)),
                ("selection", exp.selection))}}


# --------------------------------------------------------------------------- training's run


TRAIN_BUDGET = ("max_steps", "max_epochs", "max_minutes")
"""Training's bounds: a larger one continues a finished run."""

TRAIN_OPERATIONAL = ("threads", "device", "log_every", "compile", "max_nonfinite")
"""Train keys that change how a run goes, not its weights or its checkpoints (a run that
``max_nonfinite`` would stop ends in an error, not in other weights)."""


def _train_budget(config: Config) -> dict[str, Any]:
    return {key: getattr(config.train, key) for key in TRAIN_BUDGET}


def _holds_run(exp: ExperimentDir) -> bool:
    return exp.checkpoint_link("last").is_symlink() or any(exp.checkpoints.glob("step_*"))


def _decide_training(config: Config, attempt: Attempt) -> bool:
    """Continue the run in ``checkpoints/`` if this config describes it (an interrupted run, or
    a finished one that a larger budget extends); else move it aside, never delete it. A run
    that no pipeline made (``mtkit train``'s) is continued or refused, as ``mtkit train`` does."""
    exp = ExperimentDir(config.experiment.dir)
    if not _holds_run(exp):
        # A fresh run would append to the logs of an attempt killed before its first checkpoint.
        if attempt.stamped and (exp.train_log.exists() or exp.tensorboard.exists()):
            attempt.say(f"moved the logs of the last attempt aside to {_set_aside(exp, attempt.previous or 'logs')}; "
                        "running")
        else:
            attempt.say("running")
        return False
    last = exp.checkpoint_link("last")
    held = attempt.previous or _held_key(config, exp)
    why: str | None
    if attempt.forced:
        why = "asked by --from"
    elif not last.exists():
        why = "it has no complete checkpoint"
    elif held != attempt.key:
        why = _changed(config, last) or ("the tokenizer or the prepared data changed" if held else
                                         "its checkpoint cannot be read")
    else:
        why = _past_budget(config, last)
    if why is None:
        attempt.say(_resuming(config, last, attempt))
        return True
    if not attempt.stamped and not attempt.forced:
        train = attempt.command.replace("mtkit pipeline", "mtkit train", 1)
        raise MtkitError(
            f"{exp.checkpoints}: holds a run of `mtkit train` that this config does not continue ({why}); "
            f"continue it with `{train} --resume`, or move it aside and train afresh with "
            f"`{attempt.command} --from train`")
    aside = _set_aside(exp, held or attempt.key)
    attempt.say(f"moved the previous run aside to {aside} ({why}); running")
    return False


def _held_key(config: Config, exp: ExperimentDir) -> str | None:
    """The key of a run that no stamp of this mtkit describes (made by `mtkit train` or an older
    pipeline): from its checkpoint's config and tokenizer, its data taken to be this
    experiment's when its data settings are this config's."""
    from mtkit.checkpoint import read_checkpoint_config, read_meta

    last = exp.checkpoint_link("last")
    try:
        saved, meta = read_checkpoint_config(last), read_meta(last)
    except MtkitError:
        return None
    reads = {**_train_reads(config), "tokenizer": meta.get("tokenizer_fingerprint")}
    if _training_data(saved) != _training_data(config):
        reads.update(train=None, valid=None)
    try:
        return stage_key(saved, _stage("train"), reads)
    except MtkitError:  # its pretrained model is gone
        return None


def _training_data(config: Config) -> dict[str, Any]:
    """The data settings that shape the train and valid splits."""
    data = config.to_dict()["data"]
    for key in ("num_proc", "chunk_size", *(() if config.data.remove_eval_overlap else ("test",))):
        data.pop(key)
    return data


def _changed(config: Config, last: Path) -> str | None:
    """The keys of training's key in which the run's checkpoint differs from ``config``."""
    from mtkit.checkpoint import read_checkpoint_config

    try:
        saved = read_checkpoint_config(last)
    except MtkitError:
        return None
    stage = _stage("train")
    try:
        config = stage.view(config)
    except MtkitError:
        return None
    return _differences(_pick(saved.to_dict(), stage.sections, stage.ignores),
                        _pick(config.to_dict(), stage.sections, stage.ignores))


def _differences(old: dict, new: dict, prefix: str = "") -> str | None:
    """``key old -> new`` for each leaf that differs, comma-separated (None if none does)."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.append(_differences(a, b, f"{path}.") or "")
        elif a != b:
            changes.append(f"{path} {a} -> {b}")
    return ", ".join(c for c in changes if c) or None


def _past_budget(config: Config, last: Path) -> str | None:
    """Why the run in ``last`` went further than ``config``'s budget allows, if it did: a run
    trained to that budget would have stopped before it."""
    from mtkit.checkpoint import load_trainer_state, read_checkpoint_config, read_meta

    cfg, meta = config.train, read_meta(last)
    if meta["step"] > cfg.max_steps:
        return f"it has {meta['step']} updates, train.max_steps is {cfg.max_steps}"
    if cfg.max_epochs is not None and meta["epoch"] > cfg.max_epochs:
        return f"it reached epoch {meta['epoch']}, train.max_epochs is {cfg.max_epochs}"
    ran_to = read_checkpoint_config(last).train.max_minutes
    if cfg.max_minutes is not None and (ran_to is None or cfg.max_minutes < ran_to):
        # Under a budget no smaller than the one it ran to, the run took no update too late.
        minutes = (load_trainer_state(last).get("state") or {}).get("elapsed_s", 0.0) / 60
        if minutes > cfg.max_minutes:
            return f"it trained {minutes:.1f} minutes, train.max_minutes is {cfg.max_minutes:g}"
    return None


def _resuming(config: Config, last: Path, attempt: Attempt) -> str:
    from mtkit.checkpoint import read_checkpoint_config, read_meta

    if attempt.interrupted:
        return "resuming the interrupted run"
    changes = _differences(_train_budget(read_checkpoint_config(last)), _train_budget(config), "train.")
    line = f"resuming the run at step {read_meta(last)['step']}" + (f" ({changes})" if changes else "")
    if config.train.schedule == "cosine" or config.train.cooldown > 0:
        line += ("; its learning rate follows the new budget from here, so it will differ from a run "
                 "trained to it from the start (--from train trains afresh)")
    return line


def _set_aside(exp: ExperimentDir, key: str) -> Path:
    """Move the run in ``checkpoints/``, with its train log and TensorBoard logs, to a new
    ``checkpoints.{key}/`` (numbered if that exists); return it."""
    aside = exp.root / f"{exp.checkpoints.name}.{key}"
    number = 2
    while aside.exists() or aside.is_symlink():
        aside, number = exp.root / f"{exp.checkpoints.name}.{key}-{number}", number + 1
    if exp.checkpoints.exists():
        exp.checkpoints.rename(aside)
    else:
        aside.mkdir()
    for path in (exp.train_log, exp.tensorboard):
        if path.exists():
            path.rename(aside / path.name)
    return aside


# --------------------------------------------------------------------------- the stages


PRETRAINED_SOURCE = ("pretrained.huggingface", "pretrained.revision", "pretrained.run")
"""Where a fine-tuning experiment's model comes from: what its tokenizer (a copy) follows."""

PIPELINE = [
    Stage("import", ("pretrained.huggingface", "pretrained.revision"), _run_import, _import_reads, _import_readable,
          decide=_decide_import, applies=lambda c: c.pretrained.huggingface is not None),
    # The weight mixes the synthetic pairs into training; it does not change them.
    Stage("backtranslate", ("backtranslation", "experiment.seed"), _run_backtranslate, _backtranslate_reads,
          _backtranslate_readable, ignores=("backtranslation.weight",),
          applies=lambda c: c.backtranslation.model is not None),
    # SentencePiece's vocabulary differs a little with tokenizer.num_threads (the threads share
    # out its work), as weights do in their last bits with train.threads: neither retrains.
    Stage("tokenizer", ("tokenizer", "data.train", "data.language_token", "experiment.seed", *PRETRAINED_SOURCE),
          _run_tokenizer,
          _tokenizer_reads, _tokenizer_readable, ignores=("tokenizer.num_threads",)),
    Stage("prepare", ("data",), _run_prepare, _prepare_reads, _data_readable,
          ignores=("data.num_proc", "data.chunk_size", "data.temperature")),
    # Validation decodes with the decode section, but a new beam size should not mean retraining.
    Stage("train", ("model", "train", "experiment.seed", "pretrained"), _run_train, _train_reads,
          lambda c: ExperimentDir(c.experiment.dir).checkpoint_link("last").exists(),
          ignores=tuple(f"train.{key}" for key in (*TRAIN_OPERATIONAL, *TRAIN_BUDGET, "average_last")),
          budget=_train_budget, decide=_decide_training, view=_finetuned),
    Stage("select", ("train.best_metric", "train.average_last", "decode"), _run_select, _select_reads,
          lambda c: ExperimentDir(c.experiment.dir).checkpoint_link("final").exists()),
    Stage("translate", ("decode",), _run_translate, _translate_reads,
          lambda c: ExperimentDir(c.experiment.dir).test_hypotheses(c.data.tgt_lang).exists()),
    Stage("score", ("data.tgt_lang", "experiment.name"), _run_score, _score_reads,
          lambda c: ExperimentDir(c.experiment.dir).report_json.exists()),
]


# Config keys added after mtkit 0.2.0, with their defaults: a key at its default leaves a stage's
# key as 0.2.0 computed it, so that upgrading mtkit re-runs nothing.
ADDED_DEFAULTS: dict[str, Any] = {
    "model.scale_embeddings": True,
    "model.embedding_norm": False,
    "model.output_bias": False,
    "model.share_positions": True,
    "model.norm_type": "layer",
    "model.norm_eps": 1e-5,
    "model.bias": True,
    "model.kv_heads": None,
    "model.scale_attention": True,
    "model.head_dim": None,
    "model.separator": "eos_bos",
    "decode.long_lines": "split",
    "model.scale_output": False,
    "model.rope_base": 10000.0,
    "model.relative_buckets": 32,
    "model.relative_max_distance": 128,
    "pretrained": {"huggingface": None, "revision": None, "run": None, "freeze": []},
    "pretrained.huggingface": None,
    "pretrained.revision": None,
    "pretrained.run": None,
    "data.language_token": "source",
    "data.temperature": 1.0,
}

CORPUS_ADDED_DEFAULTS: dict[str, Any] = {"src_lang": None, "tgt_lang": None, "weight": 1.0}
"""The same for the keys of each corpus (``data.train.N``, ``data.valid``, ``data.test``)."""


def _stage(name: str) -> Stage:
    return next(stage for stage in PIPELINE if stage.name == name)


def stage_key(config: Config, stage: Stage, reads: dict[str, Any] | None = None) -> str:
    """A hash of what ``stage``'s outputs depend on under ``config``: its config keys and what
    it reads (``reads``, by default ``stage.reads(config)``)."""
    picked = _pick(stage.view(config).to_dict(), stage.sections, stage.ignores)
    for key, default in ADDED_DEFAULTS.items():  # keys added later count only once changed
        if key in picked:  # a stage's whole section (or dotted key) that is new
            if picked[key] == default:
                del picked[key]
            continue
        section, _, name = key.rpartition(".")
        node = picked.get(section)
        if isinstance(node, dict) and node.get(name, default) == default:
            node.pop(name, None)
    for corpus in _corpora(picked):
        for name, default in CORPUS_ADDED_DEFAULTS.items():
            if corpus.get(name, default) == default or name == "weight":  # weights are training's (_mix)
                corpus.pop(name, None)
    reads = stage.reads(config) if reads is None else reads
    blob = json.dumps({"sections": picked, "reads": reads}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _corpora(picked: dict) -> list[dict]:
    """The corpus mappings among a stage's picked config values."""
    data = picked.get("data") or {}
    found = [picked.get("data.train"), *(data.get(split) for split in ("train", "valid", "test"))]
    corpora: list[dict] = []
    for value in found:
        corpora += [c for c in (value if isinstance(value, list) else [value]) if isinstance(c, dict)]
    return corpora


def _pick(data: dict, sections: tuple[str, ...], ignores: tuple[str, ...]) -> dict:
    """The values of ``sections`` (dotted keys) in the config dict ``data``, less ``ignores``."""
    picked = {}
    for key in sections:
        node = data
        for part in key.split("."):
            node = node[part]
        picked[key] = copy.deepcopy(node)
    for key in ignores:
        *parents, last = key.split(".")
        node = picked
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return picked


# mtkit 0.2 stamped each stage with a hash of its config sections and input files chained
# through the hash of the stage before, leaving tokenizer.normalization out at identity. Such a
# stamp still says its stage is up to date where that hash matches (and the stage's outputs are
# readable: a tokenizer's recorded normalisation is checked as any other's); it is then
# rewritten with the stage's key.
_LEGACY = {
    "tokenizer": (("tokenizer", "data.train"), ()),
    "prepare": (("data",), ()),
    "train": (("model", "train", "experiment.seed"), ("train.average_last",)),
    "select": (("train.best_metric", "train.average_last", "decode"), ()),
    "translate": (("decode",), ()),
    "score": (("data.tgt_lang",), ()),
}


def _legacy_hash(config: Config, name: str, previous: str) -> str:
    data = config.to_dict()
    if data["tokenizer"]["normalization"] == "identity":
        del data["tokenizer"]["normalization"]
    corpora: dict[str, list[CorpusConfig | None]] = {
        "tokenizer": [*config.data.train], "prepare": [*config.data.train, *_eval_corpora(config)]}
    blob = json.dumps({"sections": _pick(data, *_LEGACY[name]), "files": _files(corpus_files(corpora.get(name, []))),
                       "previous": previous}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stamp_path(config: Config, name: str, suffix: str = "") -> Path:
    return ExperimentDir(config.experiment.dir).stamp(name, suffix)


def _read_stamp(path: Path) -> dict:
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def run_pipeline(config: Config, start: str | None = None, log: Callable[[str], None] = print,
                 command: str = "mtkit pipeline -c CONFIG") -> dict:
    """Run every stage that is not up to date (and every stage from ``start`` on); return the
    report written by the last stage. ``command`` continues the pipeline (said when a signal
    stops training)."""
    if start is not None and start not in STAGES:
        raise MtkitError(f"--from {start}: unknown stage; choose one of {', '.join(STAGES)}")
    if start == "import" and config.pretrained.huggingface is None:
        raise MtkitError("--from import: the config imports nothing (pretrained.huggingface is not set)")
    exp = ExperimentDir(config.experiment.dir)
    save_config(config, exp.config)
    config = with_backtranslation(config)  # saved as written: the synthetic corpus is the pipeline's
    legacy, forced = "", False
    for stage in PIPELINE:
        if not stage.applies(config):
            continue
        forced = forced or stage.name == start
        key, budget = stage_key(config, stage), stage.budget(config)
        legacy = _legacy_hash(config, stage.name, legacy) if stage.name in _LEGACY else legacy
        stamp, started = _stamp_path(config, stage.name), _stamp_path(config, stage.name, ".started")
        done, began = _read_stamp(stamp), _read_stamp(started)
        if not forced and "key" not in done and done.get("hash") == legacy and stage.readable(config):
            done = {**done, "key": key, **({"budget": budget} if budget else {})}
            atomic_write_text(stamp, json.dumps(done))
        if not forced and done.get("key") == key and done.get("budget", {}) == budget and stage.readable(config):
            log(f"pipeline: {stage.name}: up to date, skipped")
            continue
        attempt = Attempt(stage.name, key, began.get("key") if began else done.get("key"), bool(done or began),
                          bool(began), forced, log, command)
        attempt.resume = stage.decide(config, attempt)
        # Whatever the old stamp said no longer holds once the stage starts changing its outputs.
        atomic_write_text(started, json.dumps({"key": key}))
        stamp.unlink(missing_ok=True)
        clock = time.time()
        stage.run(config, attempt)
        seconds = time.time() - clock
        atomic_write_text(stamp, json.dumps({"key": key, **({"budget": budget} if budget else {}),
                                             "seconds": round(seconds, 1), "finished": time.time()}))
        started.unlink(missing_ok=True)
        log(f"pipeline: {stage.name}: done in {seconds:.0f} s")
    return json.loads(exp.report_json.read_text())


# --------------------------------------------------------------------------- select


def select_final_model(config: Config) -> dict:
    """Choose the final model among the ``best`` and ``last`` checkpoints and the average of
    the newest ``train.average_last`` step checkpoints (written to ``checkpoints/average``):
    the one with the best ``train.best_metric`` on the whole validation set. Point
    ``checkpoints/final`` at it and write ``selection.json``; return what that holds.

    A checkpoint whose stored validation covered every validation sentence with these decode
    settings is not decoded again, so the usual cost is one decoding of the validation set
    (the average's). Without validation data the choice is ``best`` (the newest checkpoint).
    """
    from mtkit.checkpoint import average_checkpoints, mark_final, read_checkpoint_config, read_meta, step_checkpoints
    from mtkit.train import better

    exp = ExperimentDir(config.experiment.dir)
    root, cfg, metric = exp.checkpoints, config.train, config.train.best_metric
    candidates: dict[str, Path] = {}
    for link in ("best", "last"):
        if exp.checkpoint_link(link).exists() and exp.checkpoint_link(link).resolve() not in candidates.values():
            candidates[link] = exp.checkpoint_link(link).resolve()
    if not candidates:
        raise MtkitError(f"{root}: no checkpoint to choose from; run `mtkit train` first")
    scorer = _ValidationScorer(_finetuned(config)) if config.data.valid is not None else None
    averaged = step_checkpoints(root)[-cfg.average_last:] if cfg.average_last >= 2 and scorer is not None else []
    if len(averaged) >= 2:
        candidates["average"] = average_checkpoints(averaged, root / "average")
    scores: dict[str, dict] = {}
    for name, directory in candidates.items():
        meta = read_meta(directory)
        metrics = meta.get("metrics") or {}
        # Training's scores stand if they are this stage's: same decoding, every sentence.
        stale = read_checkpoint_config(directory).decode != config.decode or metric not in metrics or (
            cfg.valid_bleu and metrics.get("sentences") != (scorer.sentences if scorer else None))
        if scorer is not None and (stale or name == "average"):
            metrics = scorer(directory)
        scores[name] = {"checkpoint": directory.name, "step": meta["step"],
                        **{k: round(v, 4) for k, v in metrics.items() if k in ("loss", "bleu", "chrf")},
                        **({"directions": metrics["directions"]} if "directions" in metrics else {})}
    chosen = next(iter(scores))
    for name, row in scores.items():
        if metric in row and metric in scores[chosen] and better(metric, row[metric], scores[chosen][metric]):
            chosen = name
    mark_final(root, candidates[chosen])
    selection = {
        "metric": metric,
        "sentences": scorer.sentences if scorer is not None else 0,
        "chosen": chosen,
        "step": scores[chosen]["step"],
        "averaged_steps": [read_meta(d)["step"] for d in averaged] if chosen == "average" else [],
        "updates": read_meta(exp.checkpoint_link("last"))["step"],
        "candidates": scores,
    }
    atomic_write_text(exp.selection, json.dumps(selection, indent=2) + "\n")
    return selection


class _ValidationScorer:
    """Loss, BLEU and chrF of a checkpoint on the whole validation set, computed as training
    validates (``mtkit.evaluate.validation_loss`` and ``validation_bleu``)."""

    def __init__(self, config: Config):
        from mtkit.experiment import load_experiment
        from mtkit.runtime import setup_runtime

        self.config = config.model_copy(deep=True)
        self.config.train.valid_max_sentences = None
        self.runtime = setup_runtime(config.train)
        self.exp = load_experiment(config)
        self.sentences = len(self.exp.valid_text[0]) if self.exp.valid_text else 0

    def __call__(self, directory: Path) -> dict:
        from mtkit.checkpoint import load_for_inference
        from mtkit.evaluate import validation_bleu, validation_loss

        model = load_for_inference(directory, device=str(self.runtime.device)).model
        metrics: dict = {}
        if self.exp.valid is not None:
            metrics.update(validation_loss(model, self.exp.valid, self.config.train.max_tokens, self.runtime))
        if self.config.train.valid_bleu:
            metrics.update(validation_bleu(self.config, self.exp, model, self.runtime))
        return metrics


# --------------------------------------------------------------------------- translate + score


def translate_test_set(config: Config) -> Path:
    """Translate the prepared test split with the best checkpoint, with the backend that
    ``mtkit translate`` would use (named on stderr); write hypotheses and references."""
    import torch

    from mtkit.data import load_split, split_groups
    from mtkit.engines import open_translator

    exp = ExperimentDir(config.experiment.dir)
    test = load_split(exp.root, "test")
    sources = list(test["src"])
    groups = split_groups(exp.root, "test")
    hyps: list[str] = []
    for group in groups:  # one for a model of one pair: it takes no languages
        languages = (group.src_lang, group.tgt_lang) if len(groups) > 1 else (None, None)
        with open_translator(exp.root, config.decode, _device(config), threads=config.train.threads,
                             workers=config.train.threads or torch.get_num_threads(), seed=config.experiment.seed,
                             say=_say, warn=lambda m: _say(f"warning: {m}"), src_lang=languages[0],
                             tgt_lang=languages[1]) as translator:
            hyps += translator.translate(sources[group.start : group.end])
    lang = config.data.tgt_lang
    atomic_write_text(exp.test_references(lang), "".join(line + "\n" for line in test["tgt"]))
    atomic_write_text(exp.test_hypotheses(lang), "".join(line + "\n" for line in hyps))
    return exp.test_hypotheses(lang)


def _say(message: str) -> None:
    print(f"mtkit: {message}", file=sys.stderr, flush=True)


def _device(config: Config) -> str:
    from mtkit.runtime import training_device

    return training_device(config.train.device)


def write_report(config: Config) -> dict:
    """Score the test translations and write report.json, report.md and a training plot."""
    from mtkit.checkpoint import META
    from mtkit.compare import training_record
    from mtkit.score import score

    exp = ExperimentDir(config.experiment.dir)
    lang = config.data.tgt_lang
    hyps = exp.test_hypotheses(lang).read_text().splitlines()
    refs = exp.test_references(lang).read_text().splitlines()
    bleu, chrf, ter = score(hyps, [refs], ("bleu", "chrf", "ter"), tgt_lang=lang)
    lower = score([h.lower() for h in hyps], [[r.lower() for r in refs]], ("bleu",), tgt_lang=lang)[0]
    directions = _direction_scores(exp, hyps, refs)
    log = _read_train_log(exp.train_log)
    valids = [row for row in log if row.get("type") == "valid"]
    selection = _read_stamp(exp.selection)
    best_valid = max((row for row in valids if "bleu" in row), key=lambda r: r["bleu"], default={})
    if selection.get("sentences"):  # the final model's own scores on the whole validation set
        best_valid = selection["candidates"][selection["chosen"]]
    data_report = _read_stamp(exp.data_report)
    meta = next((m for m in (_read_stamp(exp.checkpoint_link(link) / META) for link in ("final", "best", "last")) if m),
                {})
    stages = {stage.name: _read_stamp(_stamp_path(config, stage.name)).get("seconds")
              for stage in PIPELINE[:-1] if stage.applies(config)}
    # The trainer's own clock counts every attempt of a resumed run; the stage's, the last one only.
    updates, train_seconds, _ = training_record(exp.checkpoint_link("last"))
    report = {
        "experiment": config.experiment.name or exp.root.name,
        "data": {
            split: {k: v for k, v in counts.items() if k in ("read", "kept")}
            for split, counts in (data_report.get("splits") or {}).items()
            if isinstance(counts, dict)
        },
        "model": {"size": _model_label(config), "parameters": _count_parameters(exp), "step": meta.get("step"),
                  "updates": updates, "selected": _describe_selection(selection)},
        "selection": selection,
        "train_seconds": train_seconds or stages.get("train"),
        "valid": {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in best_valid.items()
            if k in ("step", "loss", "ppl", "bleu", "chrf", "bleu_signature")
        },
        "test": {
            "bleu": round(bleu.score, 2),
            "chrf": round(chrf.score, 2),
            "ter": round(ter.score, 2),
            "bleu_lowercase": round(lower.score, 2),
            "signature": bleu.signature,
            "chrf_signature": chrf.signature,
            "ter_signature": ter.signature,
            "sentences": len(hyps),
        },
        "stage_seconds": stages,
    }
    if directions:  # a multilingual model: its scores per direction, and their means
        report["test"] = {"bleu": round(sum(d["bleu"] for d in directions.values()) / len(directions), 2),
                          "chrf": round(sum(d["chrf"] for d in directions.values()) / len(directions), 2),
                          "sentences": len(hyps),
                          "signature": " / ".join(dict.fromkeys(d["signature"] for d in directions.values())),
                          "directions": directions}
        report["valid"] = {**report["valid"], "directions": best_valid.get("directions", {})}  # type: ignore[dict-item]
    atomic_write_text(exp.report_json, json.dumps(report, indent=2) + "\n")
    atomic_write_text(exp.report_md, _markdown(report))
    _plot(log, exp.plot)
    return report


def _direction_scores(exp: ExperimentDir, hyps: list[str], refs: list[str]) -> dict[str, dict[str, Any]]:
    """BLEU and chrF of each direction of a multilingual test set (rows as the prepared split's
    groups); empty for a test set of one direction."""
    from mtkit.data import split_groups
    from mtkit.score import score

    groups = split_groups(exp.root, "test")
    if len(groups) < 2 or len(hyps) != groups[-1].end:
        return {}
    found = {}
    for group in groups:
        part = slice(group.start, group.end)
        bleu, chrf = score(hyps[part], [refs[part]], ("bleu", "chrf"), tgt_lang=group.tgt_lang)
        found[group.direction] = {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2),
                                  "sentences": group.end - group.start, "signature": bleu.signature}
    return found


def _model_label(config: Config) -> str:
    """The model's size, or what it was fine-tuned from."""
    pretrained = config.pretrained
    if pretrained.given:
        return f"fine-tuned from {pretrained.huggingface or pretrained.run}"
    return config.model.size


def _describe_selection(selection: dict) -> str | None:
    """One line: which model the select stage kept and on what evidence."""
    if not selection:
        return None
    chosen, metric = selection["chosen"], selection["metric"]
    what = (f"average of steps {', '.join(map(str, selection['averaged_steps']))}" if chosen == "average"
            else f"{chosen} checkpoint (step {selection['step']})")
    if not selection["sentences"]:
        return f"{what}: no validation data to choose on"
    others = ", ".join(f"{name} {row[metric]}" for name, row in selection["candidates"].items()
                       if name != chosen and metric in row)
    value = selection["candidates"][chosen].get(metric)
    label = {"bleu": "highest BLEU", "chrf": "highest chrF", "loss": "lowest loss"}[metric]
    return (f"{what}: {label} on the {selection['sentences']:,} validation sentences ({value}"
            + (f"; {others})" if others else ")"))


def _count_parameters(exp: ExperimentDir) -> int | None:
    """Parameters of the final (else best, else last) checkpoint, read from the safetensors header alone
    (each shared tensor is stored, and counted, once)."""
    from safetensors import safe_open

    from mtkit.checkpoint import WEIGHTS

    for name in ("final", "best", "last"):
        path = exp.checkpoint_link(name) / WEIGHTS
        if path.exists():
            with safe_open(str(path), framework="pt") as weights:
                return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
    return None


def _read_train_log(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return rows


def _run_rows(report: dict) -> list[tuple[str, Any]]:
    """The report's rows on the experiment, its data, model and training."""
    model = report["model"]
    return [
        ("experiment", report["experiment"]),
        *[(f"{split} pairs kept / read", f"{c.get('kept')} / {c.get('read')}") for split, c in report["data"].items()],
        ("model", f"{model['size']}, {model['parameters'] or 0:,} parameters, {model['updates'] or 0:,} updates"),
        ("final model", model["selected"] or f"step {model['step']}"),
        ("training time", f"{(report['train_seconds'] or 0) / 60:.1f} min"),
    ]


def _markdown(report: dict) -> str:
    test, valid = report["test"], report["valid"]
    if "directions" in test:
        return _markdown_multilingual(report)
    rows = [
        *_run_rows(report),
        ("valid BLEU / chrF (final model)", f"{valid.get('bleu')} / {valid.get('chrf')}"),
        ("test BLEU", f"{test['bleu']}"),
        ("test BLEU, lowercased", f"{test['bleu_lowercase']}"),
        ("test chrF", f"{test['chrf']}"),
        ("test TER", f"{test['ter']}"),
    ]
    lines = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    lines += ["", f"BLEU signature: `{test['signature']}`", "", f"chrF signature: `{test['chrf_signature']}`", ""]
    return "\n".join(lines)


def _markdown_multilingual(report: dict) -> str:
    """The report of a multilingual model: its rows, then a table of the directions."""
    test, valid = report["test"], report["valid"]
    rows = [
        *_run_rows(report),
        ("valid BLEU / chrF (mean of directions, final model)", f"{valid.get('bleu')} / {valid.get('chrf')}"),
        ("test BLEU / chrF (mean of directions)", f"{test['bleu']} / {test['chrf']}"),
    ]
    lines = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["| direction | test sentences | test BLEU | test chrF | valid BLEU | valid chrF |",
              "|---|---:|---:|---:|---:|---:|"]
    for direction, scores in test["directions"].items():
        seen = valid.get("directions", {}).get(direction, {})
        lines.append(f"| {direction} | {scores['sentences']} | {scores['bleu']} | {scores['chrf']} | "
                     f"{_rounded(seen.get('bleu'))} | {_rounded(seen.get('chrf'))} |")
    signatures = dict.fromkeys(scores["signature"] for scores in test["directions"].values())
    lines += ["", *[f"BLEU signature: `{signature}`" for signature in signatures], ""]
    return "\n".join(lines)


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _plot(log: list[dict], path: Path) -> None:
    """Training and validation loss, and validation BLEU, against updates (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [r for r in log if r.get("type") == "train" and "loss" in r]
    valid = [r for r in log if r.get("type") == "valid" and "loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    left.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid loss")
    left.set_xlabel("update")
    left.set_ylabel("loss")
    left.legend()
    bleu = [r for r in valid if r.get("bleu") is not None]
    right.plot([r["step"] for r in bleu], [r["bleu"] for r in bleu], "o-", color="tab:green")
    right.set_xlabel("update")
    right.set_ylabel("valid BLEU")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
