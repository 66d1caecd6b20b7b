#!/usr/bin/env python
"""Translation speed and quality: mtkit against Hugging Face ``generate`` and CTranslate2,
on the same weights, measured in one run.

    .venv/bin/python scripts/bench_translate.py [--run RUN_DIR] [--json]

Without ``--run`` a post-norm ``small`` model is trained for ``--minutes`` on Multi30k with
the mtkit CLI (into runs/bench_translate). The model is exported to Marian
(``mtkit.export``) and to CTranslate2 (float32 and int8). Every system translates the same
batches (sources sorted by length, cut into batches of ``--batch``; batch 1 on the first
``--batch1-sentences``) with the same beam size, length-penalty alpha, minimum and maximum
lengths, on ``--threads`` CPU threads. Reported per system: sentences/s, output tokens/s,
peak resident memory while translating (and its growth), BLEU against the references, and
the share of outputs identical to mtkit's. mtkit runs with the allocator policy that its
commands set (``mtkit.malloc``: freed memory stays in the process), the peers with glibc's
defaults.

Known differences (outputs may differ where beam candidates are close): mtkit divides a
hypothesis's log-probability by GNMT's ((5 + length) / 6) ** alpha; Marian and CTranslate2
by length ** alpha. Marian and CTranslate2 take one maximum length per batch (mtkit: one per
sentence, a * source_length + b), so they get the batch's largest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from benchlib import MTKIT, MULTI30K, ROOT, Clocks, PeakMemory, source_tensor

from mtkit.checkpoint import Loaded, load_for_inference
from mtkit.config import DecodeConfig
from mtkit.export import (
    CT2Translator,
    CTranslate2Exporter,
    HuggingFaceExporter,
    export,
    marian_generation_config,
)
from mtkit.fileio import read_lines
from mtkit.malloc import keep_freed_memory
from mtkit.score import score
from mtkit.translate import Translator
from mtkit.vocab import EOS_ID, PAD_ID

IdsFn = Callable[[list[list[int]]], list[list[int]]]


# --------------------------------------------------------------------------- the model


def random_model(run_dir: Path, size: str) -> Loaded:
    """An untrained post-norm model of ``size`` on ``run_dir``'s tokenizer. Its outputs run to
    the maximum length in every system: equal work, a pure speed comparison (BLEU is ~0)."""
    from mtkit.config import validate_config
    from mtkit.model import Transformer

    base = load_for_inference(run_dir)
    config = validate_config({**base.config.to_dict(), "model": {"size": size, "norm": "post", "dropout": 0.0}})
    torch.manual_seed(0)
    tok = base.tokenizers
    model = Transformer(config.model, tok.src.vocab_size, tok.tgt.vocab_size, tok.joint).eval()
    return Loaded(model=model, config=config, tokenizers=base.tokenizers, meta={}, path=base.path)


def train_quick_model(run_dir: Path, minutes: float) -> None:
    """A post-norm small model on Multi30k through the mtkit CLI (tokenizer, prepare, train)."""
    settings = [
        f"experiment.dir={run_dir}", "model.norm=post", f"train.max_minutes={minutes}",
        # Small batches and a short warm-up: ~450 updates in 50 contended minutes reached
        # validation BLEU 18, enough for outputs of realistic length.
        "train.lr=0.0007", "train.warmup_steps=400", "train.max_tokens=2048",
        "train.valid_every=400", "train.valid_max_sentences=100",
    ]
    args = [f"--set={s}" for s in settings]
    config = str(ROOT / "configs" / "multi30k_en_de.yaml")
    for stage in (["tokenizer", "train"], ["prepare"], ["train"]):
        subprocess.run([*MTKIT, *stage, "-c", config, *args], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- the systems


def mtkit_system(loaded: Loaded, decode: DecodeConfig) -> IdsFn:
    translator = Translator(loaded.model, loaded.tokenizers, decode)
    return lambda batch: [hyps[0].tokens if hyps else [] for hyps in translator.search(batch)]


def hf_system(model_dir: Path, loaded: Loaded, decode: DecodeConfig, early_stopping: bool | str) -> IdsFn:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    marian = transformers.MarianMTModel.from_pretrained(model_dir).eval()
    generation = marian_generation_config(loaded, decode)
    generation.early_stopping = early_stopping

    def run(batch: list[list[int]]) -> list[list[int]]:
        src = source_tensor(batch)
        longest = max(len(ids) for ids in batch) + 1  # with its EOS, as mtkit counts
        limit = int(math.floor(decode.max_len_a * longest + decode.max_len_b))
        limit = min(limit, loaded.config.model.max_positions - 2)
        generation.max_new_tokens = limit + 1  # + EOS
        generation.max_length = None
        with torch.inference_mode():
            out = marian.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), generation_config=generation)
        return [[t for t in row[1:] if t not in (PAD_ID, EOS_ID)] for row in out.tolist()]

    return run


def ct2_system(model_dir: Path, loaded: Loaded, decode: DecodeConfig, threads: int) -> IdsFn:
    translator = CT2Translator(model_dir, loaded.tokenizers, decode, intra_threads=threads, exact_lengths=False)
    return translator.translate_ids


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    system: str
    batch: int
    sentences: int
    seconds: float
    sent_per_s: float
    tok_per_s: float
    peak_rss_mb: float
    rss_growth_mb: float
    bleu: float | None = None
    identical_to_mtkit: float | None = None


def measure(systems: dict[str, IdsFn], ids: list[list[int]], batch_size: int) -> dict[str, tuple[Run, list[list[int]]]]:
    """Translate ``ids`` with every system in batches of ``batch_size`` sentences of similar
    length. The systems take turns batch by batch (in rotating order), so that a change in
    the machine's load hits all of them alike. Outputs are in input order."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    names = list(systems)
    for fn in systems.values():
        fn([ids[order[0]]])  # warm-up: first-call allocations and lazy initialisation
    out: dict[str, list[list[int]]] = {name: [[] for _ in ids] for name in names}
    clocks = Clocks()
    with PeakMemory() as memory:
        for index, rows in enumerate(batches):
            batch = [ids[r] for r in rows]
            for name in names[index % len(names) :] + names[: index % len(names)]:
                keep_freed_memory(name == "mtkit")  # each with its allocator policy, as it ships
                memory.enter(name)
                with clocks(name):
                    hyps = systems[name](batch)
                memory.current = None
                for row, hyp in zip(rows, hyps, strict=True):
                    out[name][row] = hyp
    mb = 1 / 2**20
    results = {}
    for name in names:
        tokens, secs = sum(len(h) for h in out[name]), clocks.wall[name]
        run = Run(name, batch_size, len(ids), round(secs, 3), round(len(ids) / secs, 2), round(tokens / secs, 1),
                  round(memory.peak[name] * mb, 1), round((memory.peak[name] - memory.start[name]) * mb, 1))
        results[name] = (run, out[name])
    return results


def profile_mtkit(fn: IdsFn, ids: list[list[int]], batch_size: int, rows: int = 25) -> str:
    """Top operators (self CPU time) while mtkit translates a few batches."""
    from torch.profiler import ProfilerActivity, profile

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [[ids[r] for r in order[i : i + batch_size]] for i in range(0, len(order), batch_size)][::8]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            fn(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="Trained run or checkpoint (post-norm, for the HF comparison).")
    parser.add_argument("--minutes", type=float, default=30, help="Training budget when no --run is given.")
    parser.add_argument("--src", type=Path, default=MULTI30K / "test_2016_flickr.en.gz")
    parser.add_argument("--ref", type=Path, default=MULTI30K / "test_2016_flickr.de.gz")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=None, help="Length-penalty alpha (default: the run's).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch1-sentences", type=int, default=100, help="Sentences for the batch-1 runs (0: skip).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N test sentences.")
    parser.add_argument("--hf-early-stopping", default="never", choices=["true", "false", "never"],
                        help="generate()'s early_stopping ('never' searches as exhaustively as mtkit).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "ct2_fp32", "ct2_int8"])
    parser.add_argument("--random", metavar="SIZE", choices=["tiny", "small", "base"],
                        help="Benchmark an untrained post-norm model of this size instead (speed only).")
    parser.add_argument("--profile", action="store_true", help="Print mtkit's top operators to stderr.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    run_dir = args.run
    if run_dir is None:
        run_dir = ROOT / "runs" / "bench_translate"
        if not (run_dir / "checkpoints").is_dir():
            train_quick_model(run_dir, args.minutes)
    loaded = random_model(run_dir, args.random) if args.random else load_for_inference(run_dir)
    decode = loaded.config.decode.model_copy(update={"beam": args.beam, "nbest": 1, "sampling": False})
    if args.lenpen is not None:
        decode = decode.model_copy(update={"lenpen": args.lenpen})

    lines = [line or "" for line in read_lines(args.src)][: args.limit]
    refs = [line or "" for line in read_lines(args.ref)][: args.limit]
    ids = loaded.tokenizers.src.encode(lines)
    detok = loaded.tokenizers.tgt.decode
    tgt_lang = loaded.config.data.tgt_lang

    with tempfile.TemporaryDirectory(prefix="bench_translate.") as tmp:
        systems: dict[str, Callable[[], IdsFn]] = {"mtkit": lambda: mtkit_system(loaded, decode)}
        if "hf" not in args.skip and loaded.config.model.norm == "post":
            export(HuggingFaceExporter(), loaded, Path(tmp) / "hf")
            early = {"true": True, "false": False}.get(args.hf_early_stopping, args.hf_early_stopping)
            systems["hf"] = lambda: hf_system(Path(tmp) / "hf", loaded, decode, early)
        for name, quantization in (("ct2_fp32", None), ("ct2_int8", "int8")):
            if name not in args.skip:
                export(CTranslate2Exporter(quantization), loaded, Path(tmp) / name)
                systems[name] = lambda d=Path(tmp) / name: ct2_system(d, loaded, decode, args.threads)

        runs: list[Run] = []
        outputs: dict[tuple[str, int], list[list[int]]] = {}
        fns = {name: build() for name, build in systems.items()}
        for batch_size, subset in ((args.batch, ids), (1, ids[: args.batch1_sentences])):
            if not subset:
                continue
            for name, (run, out) in measure(fns, subset, batch_size).items():
                outputs[name, batch_size] = out
                runs.append(run)
                print(f"{name:9s} batch {batch_size:3d}: {run.sent_per_s:7.1f} sent/s", file=sys.stderr)
        profile_table = profile_mtkit(fns["mtkit"], ids, args.batch) if args.profile else ""
        del fns

    for run in runs:
        hyps = detok(outputs[run.system, run.batch])
        run.bleu = round(score(hyps, [refs[: len(hyps)]], metrics=("bleu",), tgt_lang=tgt_lang)[0].score, 2)
        ours = outputs["mtkit", run.batch]
        theirs = outputs[run.system, run.batch]
        run.identical_to_mtkit = round(sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours), 4)

    report = summary(runs, args, decode, run_dir)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(runs, report)
    if profile_table:
        print(profile_table, file=sys.stderr)


def summary(runs: list[Run], args: argparse.Namespace, decode: DecodeConfig, run_dir: Path) -> dict:
    by = {(r.system, r.batch): r for r in runs}
    ours = by["mtkit", args.batch]

    def ratio(system: str, batch: int = args.batch) -> float | None:
        other = by.get((system, batch))
        return round(by["mtkit", batch].sent_per_s / other.sent_per_s, 3) if other else None

    def bleu(system: str) -> float | None:
        other = by.get((system, args.batch))
        return other.bleu if other else None

    return {
        "tok_per_s": ours.tok_per_s,
        "sent_per_s": ours.sent_per_s,
        "peak_rss_mb": ours.peak_rss_mb,
        "speedup_vs_hf": ratio("hf"),
        "ratio_vs_ct2_fp32": ratio("ct2_fp32"),
        "ratio_vs_ct2_int8": ratio("ct2_int8"),
        "bleu": ours.bleu,
        "hf_bleu": bleu("hf"),
        "ct2_fp32_bleu": bleu("ct2_fp32"),
        "ct2_int8_bleu": bleu("ct2_int8"),
        "batch1": {
            "speedup_vs_hf": ratio("hf", 1),
            "ratio_vs_ct2_fp32": ratio("ct2_fp32", 1),
            "ratio_vs_ct2_int8": ratio("ct2_int8", 1),
        },
        "settings": {
            "run": str(run_dir), "random_weights": args.random,
            "beam": decode.beam, "lenpen": decode.lenpen, "max_len_a": decode.max_len_a,
            "max_len_b": decode.max_len_b, "min_len": decode.min_len, "batch": args.batch, "threads": args.threads,
            "hf_early_stopping": args.hf_early_stopping, "torch": torch.__version__,
            "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        },
        "runs": [asdict(r) for r in runs],
    }


def print_table(runs: list[Run], report: dict) -> None:
    header = f"{'system':9s} {'batch':>5s} {'sent':>5s} {'sent/s':>8s} {'tok/s':>8s} {'peak MB':>8s} " \
             f"{'+MB':>6s} {'BLEU':>6s} {'same as mtkit':>13s}"
    print(header)
    for r in runs:
        print(f"{r.system:9s} {r.batch:5d} {r.sentences:5d} {r.sent_per_s:8.1f} {r.tok_per_s:8.1f} "
              f"{r.peak_rss_mb:8.1f} {r.rss_growth_mb:6.1f} {r.bleu:6.2f} {r.identical_to_mtkit:13.1%}")
    keys = ("speedup_vs_hf", "ratio_vs_ct2_fp32", "ratio_vs_ct2_int8")
    print("batch {}: ".format(report["settings"]["batch"]) + ", ".join(f"{k} {report[k]}" for k in keys))
    print("batch 1: " + ", ".join(f"{k} {report['batch1'][k]}" for k in keys))
    print("settings: " + json.dumps(report["settings"]))


if __name__ == "__main__":
    main()
