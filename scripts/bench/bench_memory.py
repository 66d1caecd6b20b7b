#!/usr/bin/env python
"""Memory under load: ``mtkit translate`` on a 1,000,000-line file, and ``mtkit train`` for many
steps, must run in bounded memory.

    .venv/bin/python scripts/bench/bench_memory.py [--lines 1000000] [--train-steps 0] [--json]

Builds a tiny experiment in ``--workdir`` (default: a temporary directory): synthetic sentence
pairs, a 120-piece SentencePiece model, prepared data and a random-weight ``tiny`` checkpoint.
Translation: ``mtkit translate -m RUN -i IN -o OUT`` (greedy, at most 2 output subwords per
line, one thread) runs as a subprocess on ``--lines`` short lines, while this script samples the
process's resident memory (psutil) and the lines written so far (the growing temporary output
file) every ``--every`` seconds. ``rss_first_100k_mib`` is the peak RSS while the first 100,000
lines were being written, ``rss_last_100k_mib`` the peak while the last 100,000 were, and
``rss_growth_pct`` their difference relative to the first: flat memory means about 0.
Training (``--train-steps N``): ``mtkit train`` for N steps, RSS sampled against the step in
``train_log.jsonl``; ``train_rss_growth_pct`` compares the peak over the first and the last
tenth of the steps.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from benchlib import MTKIT, RssSampler, made_up_words, print_result, save_random_checkpoint, single_thread_env

WINDOW = 100_000


def build_experiment(workdir: Path, pairs: int = 3000) -> tuple[Path, Path]:
    """A tiny experiment (tokenizer, prepared data) and a random-weight checkpoint of it.
    Returns (config path, run directory of the checkpoint)."""
    from mtkit.config import validate_config
    from mtkit.corpus import training_text
    from mtkit.data import prepare
    from mtkit.tokenizer import Tokenizers, tokenizer_dir, train_tokenizers

    rng = random.Random(0)
    vocab = made_up_words(rng, 200)
    data = {}
    for split, count in (("train", pairs), ("valid", 50)):
        lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(count)]
        src, tgt = workdir / f"{split}.src", workdir / f"{split}.tgt"
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        tgt.write_text("".join(line[::-1] + "\n" for line in lines), encoding="utf-8")
        data[split] = {"src": str(src), "tgt": str(tgt)}
    config = {
        "experiment": {"dir": str(workdir / "run")},
        "data": data,
        "tokenizer": {"vocab_size": 120, "num_threads": 1},
        "model": {"size": "tiny"},
        "train": {"max_tokens": 600, "threads": 1, "valid_bleu": False, "best_metric": "loss", "keep_last": 1,
                  "warmup_steps": 10, "lr": 0.001},
        "decode": {"beam": 1, "max_len_a": 0.0, "max_len_b": 2},
    }
    cfg = validate_config(config)
    train_tokenizers(cfg.tokenizer, tokenizer_dir(cfg), lambda sides: training_text(cfg.data, sides))
    prepare(cfg)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path, save_random_checkpoint(cfg, Tokenizers.load(tokenizer_dir(cfg)), workdir / "model")


def bench_translate(model_run: Path, workdir: Path, lines: int, every: float) -> dict:
    rng = random.Random(1)
    vocab = made_up_words(rng, 300)
    source = workdir / "input.txt"
    with open(source, "w", encoding="utf-8") as handle:
        for start in range(0, lines, 100_000):
            block = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))
                     for _ in range(min(100_000, lines - start))]
            handle.write("".join(line + "\n" for line in block))
    out = workdir / "output.txt"
    out.unlink(missing_ok=True)
    command = [*MTKIT, "translate", "-m", str(model_run), "-i", str(source), "-o", str(out),
               "--beam", "1", "--max-len-a", "0", "--max-len-b", "2", "--threads", "1", "--chunk-lines", "10000"]
    written, offset, partial = 0, 0, None

    def lines_written() -> int:
        """The lines in the growing temporary output so far, read on from where the last call ended."""
        nonlocal written, offset, partial
        if partial is None or not partial.exists():
            found = list(workdir.glob(".output.txt.*.tmp"))
            partial, offset = (found[0], 0) if found else (None, 0)
        if partial is not None:
            try:
                with open(partial, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                written += chunk.count(b"\n")
                offset += len(chunk)
            except FileNotFoundError:  # renamed into place: finished
                pass
        return written

    samples, seconds = sampled_run(command, every, lines_written)
    with open(out, "rb") as handle:
        total = sum(1 for _ in handle)
    window = min(WINDOW, total // 2)
    first = [rss for _, rss, n in samples if 0 < n <= window]
    last = [rss for _, rss, n in samples if n >= total - window]
    first_peak, last_peak = max(first), max(last)
    return {
        "lines": total,
        "seconds": round(seconds, 1),
        "lines_per_s": round(total / seconds),
        "rss_first_100k_mib": round(first_peak, 1),
        "rss_last_100k_mib": round(last_peak, 1),
        "rss_growth_pct": round(100 * (last_peak - first_peak) / first_peak, 2),
        "rss_peak_mib": round(max(rss for _, rss, _ in samples), 1),
        "samples": len(samples),
    }


def bench_train(config: Path, workdir: Path, steps: int, every: float, precision: str | None = None) -> dict:
    data = yaml.safe_load(config.read_text())
    run = workdir / "train_run"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(data["experiment"]["dir"], run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard",
                                                                                  "*.jsonl"))
    data["experiment"]["dir"] = str(run)
    data["train"].update({"max_steps": steps, "valid_every": max(steps // 4, 1), "log_every": max(steps // 50, 1)})
    if precision is not None:
        data["train"]["precision"] = precision
    train_config = workdir / "train.yaml"
    train_config.write_text(yaml.safe_dump(data), encoding="utf-8")
    log = run / "train_log.jsonl"
    step = 0

    def step_made() -> int:
        """The last training step that ``train_log.jsonl`` records (0 before the first)."""
        nonlocal step
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            step = max((row["step"] for row in rows if row.get("type") == "train"), default=step)
        return step

    samples, seconds = sampled_run([*MTKIT, "train", "-c", str(train_config)], every, step_made)
    samples = [sample for sample in samples if sample[2]]  # from the first step on
    tenth = max(steps // 10, 1)
    first = [rss for _, rss, s in samples if s <= tenth + max(steps // 50, 1)]
    last = [rss for _, rss, s in samples if s >= steps - tenth]
    first_peak, last_peak = max(first), max(last)
    return {
        "train_steps": steps,
        "train_seconds": round(seconds, 1),
        "train_rss_first_tenth_mib": round(first_peak, 1),
        "train_rss_last_tenth_mib": round(last_peak, 1),
        "train_rss_growth_pct": round(100 * (last_peak - first_peak) / first_peak, 2),
    }


def sampled_run(command: list[str], every: float, progress: Callable[[], int]
                ) -> tuple[list[tuple[float, float, int]], float]:
    """Run the mtkit ``command`` (one thread) with its resident memory and ``progress`` sampled
    every ``every`` seconds: the samples (``RssSampler``'s) and the seconds it took; exits
    with its error output when it fails."""
    started = time.monotonic()
    proc = subprocess.Popen(command, env=single_thread_env(), stderr=subprocess.PIPE, text=True)
    with RssSampler(proc.pid, every, progress) as sampler:
        _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed ({proc.returncode}):\n{stderr}")
    return sampler.samples, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="Lines to translate (0: skip).")
    parser.add_argument("--train-steps", type=int, default=0, help="Also train this many steps (0: skip).")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="train.precision (default: the config's)")
    parser.add_argument("--every", type=float, default=0.2, help="Sampling interval, seconds.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the experiment here (default: temporary).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    if 0 < args.lines < 50_000:  # fewer finish between two samples: the windows would stay empty
        parser.error("--lines: at least 50000 (RSS of the first and last windows is compared), or 0 to skip")
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        config, model_run = build_experiment(workdir)
        result: dict = {}
        if args.lines:
            result.update(bench_translate(model_run, workdir, args.lines, args.every))
        if args.train_steps:
            result.update(bench_train(config, workdir, args.train_steps, args.every, args.precision))
    print_result(result, args.json, indent=1)


if __name__ == "__main__":
    main()
