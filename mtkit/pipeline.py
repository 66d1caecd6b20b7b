"""The whole job in order: tokenizer -> prepare -> train -> select -> translate -> score -> report.

``select`` chooses the final model: the best of the ``best`` and ``last`` checkpoints and the
average of the newest ``train.average_last`` step checkpoints, by ``train.best_metric`` on the
whole validation set; ``checkpoints/final`` points at it and ``selection.json`` says why.

Each stage, when it finishes, writes a stamp ``{dir}/stages/{stage}.json`` (every path in the
experiment directory comes from ``mtkit.rundir.ExperimentDir``) holding a hash of
what its outputs depend on: the config sections it reads, its input files (size and mtime) and
the stamp of the stage before it. A stage whose stamp matches is skipped, so re-running after a
crash or an edit does only what is needed; changing a stage's inputs re-runs it and everything
after it. A training run that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtkit.config import Config, save_config
from mtkit.corpus import corpus_files
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_bytes, atomic_write_text
from mtkit.rundir import ExperimentDir

STAGES = ("tokenizer", "prepare", "train", "select", "translate", "score")


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]
    """Config sections (or ``section.key``) whose values the stage's outputs depend on."""
    run: Callable[[Config, bool], None]
    """Runs the stage; the flag says whether an interrupted run of the same inputs may resume."""
    inputs: Callable[[Config], list[Path]] = lambda config: []
    """Files read by the stage (their size and mtime enter the hash)."""
    readable: Callable[[Config], bool] = lambda config: True
    """Whether this mtkit can read the stage's outputs. When not (outputs removed, or written
    in a format of an older mtkit), an up-to-date stage runs again; its hash is unchanged, so
    the stages after it, whose inputs are the same, stay up to date."""
    ignores: tuple[str, ...] = ()
    """Keys inside ``sections`` that the stage's outputs do not depend on."""


def _run_tokenizer(config: Config, resume: bool) -> None:
    from mtkit.data import train_tokenizer

    train_tokenizer(config)


def _run_prepare(config: Config, resume: bool) -> None:
    from mtkit.data import prepare

    prepare(config)


def _data_readable(config: Config) -> bool:
    from mtkit.data import prepared_fingerprint

    try:
        prepared_fingerprint(config.experiment.dir)
    except MtkitError:
        return False
    return True


def _run_train(config: Config, resume: bool) -> None:
    from mtkit.train import train

    exp = ExperimentDir(config.experiment.dir)
    resume = resume and exp.checkpoint_link("last").exists()
    if not resume:
        # The outputs of a training run on other inputs are stale: start afresh.
        for stale in (exp.checkpoints, exp.tensorboard):
            shutil.rmtree(stale, ignore_errors=True)
        exp.train_log.unlink(missing_ok=True)
    result = train(config, resume=resume)
    if result.interrupted:
        # Not done: no stamp, so that running the same command again resumes this run.
        raise result.stopped("run the same `mtkit pipeline` command again to resume")


def _run_select(config: Config, resume: bool) -> None:
    select_final_model(config)


def _run_translate(config: Config, resume: bool) -> None:
    translate_test_set(config)


def _run_score(config: Config, resume: bool) -> None:
    write_report(config)


PIPELINE = [
    Stage(
        "tokenizer",
        ("tokenizer", "data.train"),
        _run_tokenizer,
        lambda c: corpus_files(c.data.train),
    ),
    Stage(
        "prepare",
        ("data",),
        _run_prepare,
        lambda c: corpus_files([*c.data.train, c.data.valid, c.data.test]),
        _data_readable,
    ),
    # Validation decodes with the decode section, but a new beam size should not mean retraining.
    Stage("train", ("model", "train", "experiment.seed"), _run_train, ignores=("train.average_last",)),
    Stage("select", ("train.best_metric", "train.average_last", "decode"), _run_select),
    Stage("translate", ("decode",), _run_translate),
    Stage("score", ("data.tgt_lang",), _run_score),
]


# Keys added to the config after experiments were stamped, each with the value at which it is
# left out of the stage hashes: at that value the stamps of those experiments stay valid. (A
# tokenizer keeps the normalisation rule it was trained with: it is stored in the model file.)
ADDED_KEYS: dict[str, object] = {"tokenizer.normalization": "identity"}


def stage_hash(config: Config, stage: Stage, previous: str) -> str:
    data = config.to_dict()
    for key, neutral in ADDED_KEYS.items():
        section, name = key.split(".")
        if data[section].get(name) == neutral:
            del data[section][name]
    picked = {}
    for key in stage.sections:
        node = data
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    for key in stage.ignores:
        *parents, last = key.split(".")
        node = picked
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    files = []
    for path in stage.inputs(config):
        try:
            stat = Path(path).stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    blob = json.dumps({"sections": picked, "files": files, "previous": previous}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stamp_path(config: Config, name: str, suffix: str = "") -> Path:
    return ExperimentDir(config.experiment.dir).stamp(name, suffix)


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_pipeline(config: Config, start: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every stage that is not up to date (and every stage from ``start`` on); return the
    report written by the last stage."""
    if start is not None and start not in STAGES:
        raise MtkitError(f"--from {start}: unknown stage; choose one of {', '.join(STAGES)}")
    exp = ExperimentDir(config.experiment.dir)
    save_config(config, exp.config)
    previous, forced = "", False
    for stage in PIPELINE:
        forced = forced or stage.name == start
        digest = stage_hash(config, stage, previous)
        done = _read_stamp(_stamp_path(config, stage.name))
        if not forced and done.get("hash") == digest and stage.readable(config):
            log(f"pipeline: {stage.name}: up to date, skipped")
            previous = digest
            continue
        # A stage that started on these very inputs and did not finish may resume (training
        # continues from its last checkpoint); anything else starts afresh.
        started = _stamp_path(config, stage.name, ".started")
        resume = not forced and _read_stamp(started).get("hash") == digest
        atomic_write_text(started, json.dumps({"hash": digest}))
        action = "resuming the interrupted run" if resume and stage.name == "train" else "running"
        log(f"pipeline: {stage.name}: {action}")
        began = time.time()
        stage.run(config, resume)
        seconds = time.time() - began
        atomic_write_text(
            _stamp_path(config, stage.name),
            json.dumps({"hash": digest, "seconds": round(seconds, 1), "finished": time.time()}),
        )
        started.unlink(missing_ok=True)
        log(f"pipeline: {stage.name}: done in {seconds:.0f} s")
        previous = digest
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
    scorer = _ValidationScorer(config) if config.data.valid is not None else None
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
                        **{k: round(v, 4) for k, v in metrics.items() if k in ("loss", "bleu", "chrf")}}
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
    validates (``mtkit.train.validation_loss`` and ``validation_bleu``)."""

    def __init__(self, config: Config):
        from mtkit.runtime import setup_runtime
        from mtkit.train import load_experiment

        self.config = config.model_copy(deep=True)
        self.config.train.valid_max_sentences = None
        self.runtime = setup_runtime(config.train)
        self.exp = load_experiment(config)
        self.sentences = len(self.exp.valid_text[0]) if self.exp.valid_text else 0

    def __call__(self, directory: Path) -> dict:
        from mtkit.checkpoint import load_for_inference
        from mtkit.train import validation_bleu, validation_loss

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

    from mtkit.backend import open_backend
    from mtkit.checkpoint import load_for_inference
    from mtkit.data import load_split
    from mtkit.translate import Translator

    exp = ExperimentDir(config.experiment.dir)
    test = load_split(exp.root, "test")
    loaded = load_for_inference(exp.root, device=_device(config))
    engine = open_backend(loaded, config.decode, _device(config), threads=config.train.threads,
                          workers=config.train.threads or torch.get_num_threads(), seed=config.experiment.seed,
                          say=_say, warn=lambda m: _say(f"warning: {m}"))
    translator = Translator(loaded.model, loaded.tokenizers, config.decode, device=_device(config), backend=engine)
    with contextlib.closing(engine):
        hyps = translator.translate(list(test["src"]))
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
    log = _read_train_log(exp.train_log)
    valids = [row for row in log if row.get("type") == "valid"]
    selection = _read_stamp(exp.selection)
    best_valid = max((row for row in valids if "bleu" in row), key=lambda r: r["bleu"], default={})
    if selection.get("sentences"):  # the final model's own scores on the whole validation set
        best_valid = selection["candidates"][selection["chosen"]]
    data_report = _read_stamp(exp.data_report)
    meta = next((m for m in (_read_stamp(exp.checkpoint_link(link) / META) for link in ("final", "best", "last")) if m),
                {})
    stages = {name: _read_stamp(_stamp_path(config, name)).get("seconds") for name in STAGES[:-1]}
    # The trainer's own clock counts every attempt of a resumed run; the stage's, the last one only.
    updates, train_seconds, _ = training_record(exp.checkpoint_link("last"))
    report = {
        "experiment": config.experiment.name or exp.root.name,
        "data": {
            split: {k: v for k, v in counts.items() if k in ("read", "kept")}
            for split, counts in (data_report.get("splits") or {}).items()
            if isinstance(counts, dict)
        },
        "model": {"size": config.model.size, "parameters": _count_parameters(exp), "step": meta.get("step"),
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
    atomic_write_text(exp.report_json, json.dumps(report, indent=2) + "\n")
    atomic_write_text(exp.report_md, _markdown(report))
    _plot(log, exp.plot)
    return report


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


def _markdown(report: dict) -> str:
    test, valid, model = report["test"], report["valid"], report["model"]
    rows = [
        ("experiment", report["experiment"]),
        *[(f"{split} pairs kept / read", f"{c.get('kept')} / {c.get('read')}") for split, c in report["data"].items()],
        ("model", f"{model['size']}, {model['parameters'] or 0:,} parameters, {model['updates'] or 0:,} updates"),
        ("final model", model["selected"] or f"step {model['step']}"),
        ("training time", f"{(report['train_seconds'] or 0) / 60:.1f} min"),
        ("valid BLEU / chrF (final model)", f"{valid.get('bleu')} / {valid.get('chrf')}"),
        ("test BLEU", f"{test['bleu']}"),
        ("test BLEU, lowercased", f"{test['bleu_lowercase']}"),
        ("test chrF", f"{test['chrf']}"),
        ("test TER", f"{test['ter']}"),
    ]
    lines = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    lines += ["", f"BLEU signature: `{test['signature']}`", "", f"chrF signature: `{test['chrf_signature']}`", ""]
    return "\n".join(lines)


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
