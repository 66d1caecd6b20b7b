"""The whole job in order: tokenizer -> prepare -> train -> translate -> score -> report.

Each stage, when it finishes, writes a stamp ``{dir}/stages/{stage}.json`` (every path in the
experiment directory comes from ``mtkit.rundir.ExperimentDir``) holding a hash of
what its outputs depend on: the config sections it reads, its input files (size and mtime) and
the stamp of the stage before it. A stage whose stamp matches is skipped, so re-running after a
crash or an edit does only what is needed; changing a stage's inputs re-runs it and everything
after it. A training run that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

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

STAGES = ("tokenizer", "prepare", "train", "translate", "score")


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
    train(config, resume=resume)


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
    Stage("train", ("model", "train", "experiment.seed"), _run_train),
    Stage("translate", ("decode",), _run_translate),
    Stage("score", ("data.tgt_lang",), _run_score),
]


def stage_hash(config: Config, stage: Stage, previous: str) -> str:
    data = config.to_dict()
    picked = {}
    for key in stage.sections:
        node = data
        for part in key.split("."):
            node = node[part]
        picked[key] = node
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


# --------------------------------------------------------------------------- translate + score


def translate_test_set(config: Config) -> Path:
    """Translate the prepared test split with the best checkpoint, with the backend that
    ``mtkit translate`` would use (named on stderr); write hypotheses and references."""
    from mtkit.backend import open_backend
    from mtkit.checkpoint import load_for_inference
    from mtkit.data import load_split
    from mtkit.translate import Translator

    exp = ExperimentDir(config.experiment.dir)
    test = load_split(exp.root, "test")
    loaded = load_for_inference(exp.root, device=_device(config))
    engine = open_backend(loaded, config.decode, _device(config), threads=config.train.threads,
                          seed=config.experiment.seed, say=_say, warn=lambda m: _say(f"warning: {m}"))
    translator = Translator(loaded.model, loaded.tokenizers, config.decode, device=_device(config), backend=engine)
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
    from mtkit.score import score

    exp = ExperimentDir(config.experiment.dir)
    lang = config.data.tgt_lang
    hyps = exp.test_hypotheses(lang).read_text().splitlines()
    refs = exp.test_references(lang).read_text().splitlines()
    bleu, chrf, ter = score(hyps, [refs], ("bleu", "chrf", "ter"), tgt_lang=lang)
    lower = score([h.lower() for h in hyps], [[r.lower() for r in refs]], ("bleu",), tgt_lang=lang)[0]
    log = _read_train_log(exp.train_log)
    valids = [row for row in log if row.get("type") == "valid"]
    best_valid = max((row for row in valids if "bleu" in row), key=lambda r: r["bleu"], default={})
    data_report = _read_stamp(exp.data_report)
    meta = _read_stamp(exp.checkpoint_link("best") / META) or _read_stamp(exp.checkpoint_link("last") / META)
    stages = {name: _read_stamp(_stamp_path(config, name)).get("seconds") for name in STAGES[:-1]}
    report = {
        "experiment": config.experiment.name or exp.root.name,
        "data": {
            split: {k: v for k, v in counts.items() if k in ("read", "kept")}
            for split, counts in (data_report.get("splits") or {}).items()
            if isinstance(counts, dict)
        },
        "model": {"size": config.model.size, "parameters": _count_parameters(exp), "step": meta.get("step")},
        "train_seconds": stages.get("train"),
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


def _count_parameters(exp: ExperimentDir) -> int | None:
    """Parameters of the best (else last) checkpoint, read from the safetensors header alone
    (each shared tensor is stored, and counted, once)."""
    from safetensors import safe_open

    from mtkit.checkpoint import WEIGHTS

    for name in ("best", "last"):
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
        ("model", f"{model['size']}, {model['parameters'] or 0:,} parameters, {model['step']} updates"),
        ("training time", f"{(report['train_seconds'] or 0) / 60:.1f} min"),
        ("valid BLEU (best)", f"{valid.get('bleu')}" + (f" (step {valid['step']})" if valid.get("step") else "")),
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
