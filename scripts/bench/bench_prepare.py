"""Benchmark ``mtkit prepare`` against bare SentencePiece batch encoding.

    .venv/bin/python scripts/bench/bench_prepare.py [--quick] [--json] [--threads N] [--pairs 1000000] [--repeat 3]

For Multi30k train (and, unless --quick, a corpus of ``--pairs`` pairs made by repeating it,
each copy marked by a number appended to both sides so de-duplication keeps it), it measures:

- ``mtkit prepare`` run as a subprocess (read, normalise, filter, dedup, encode, write Arrow):
  pairs per second by prepare's own clock (``seconds`` in report.json, which excludes only
  interpreter start-up and imports) and by the subprocess wall clock, and the subprocess's
  peak RSS (from wait4's rusage);
- bare SentencePiece: ``encode(lines, num_threads=N)`` of both sides of the same lines,
  already in memory, with the same number of threads, in this process, in the same run.

``ratio_vs_spm`` is prepare's pairs/s divided by bare encoding's pairs/s on the large corpus
(on Multi30k with --quick): the median over ``--repeat`` pairs of alternated runs (each pair's
ratio is reported too). Targets: ratio >= 0.8 and peak RSS < 2 GiB on 1M pairs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import sentencepiece as spm
import yaml
from benchlib import MTKIT, MULTI30K, ROOT, RssSampler


def run_measured(args: list[str]) -> tuple[float, float, float, float]:
    """Run a command; (wall seconds, CPU seconds, peak RSS MiB of the process, peak RSS MiB of
    the process and its children together). The first comes from wait4's rusage (the kernel's
    own high-water mark); the second from polling every 50 ms (with num_proc > 1 the encoding
    workers are children, and rusage reports the largest process, not the sum)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    with RssSampler(proc.pid, every=0.05) as tree:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed:\n{stderr}")
    cpu = usage.ru_utime + usage.ru_stime
    rss = usage.ru_maxrss / 1024  # KiB on Linux
    return wall, cpu, rss, max([rss, *(mib for _, mib, _ in tree.samples)])


def write_config(path: Path, exp_dir: Path, src: Path, tgt: Path, threads: int) -> None:
    config = {
        "experiment": {"dir": str(exp_dir)},
        "data": {"train": {"src": str(src), "tgt": str(tgt)}, "num_proc": threads},
        "tokenizer": {"vocab_size": 8000, "joint": True},
    }
    path.write_text(yaml.safe_dump(config))


def bare_encode(model: Path, src: Path, tgt: Path, threads: int, chunk: int = 100_000) -> tuple[float, float, int]:
    """Wall and CPU seconds to encode both sides with SentencePiece alone (lines read
    beforehand, not timed), and the number of pairs."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    seconds = cpu = 0.0
    pairs = 0
    with open_text(src) as fs, open_text(tgt) as ft:
        while True:
            src_lines = [line.rstrip("\n") for line in islice(fs, chunk)]
            tgt_lines = [line.rstrip("\n") for line in islice(ft, chunk)]
            if not src_lines:
                return seconds, cpu, pairs
            start, start_cpu = time.perf_counter(), time.process_time()
            sp.encode(src_lines, out_type=int, num_threads=threads)
            sp.encode(tgt_lines, out_type=int, num_threads=threads)
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            pairs += len(src_lines)


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def make_large(out: Path, pairs: int) -> tuple[Path, Path]:
    """``pairs`` pairs: Multi30k train repeated, copy k marked by ' k' on both sides."""
    src_lines = gzip.decompress((MULTI30K / "train.en.gz").read_bytes()).decode().splitlines()
    tgt_lines = gzip.decompress((MULTI30K / "train.de.gz").read_bytes()).decode().splitlines()
    paths = (out / "big.en", out / "big.de")
    for path, lines in zip(paths, (src_lines, tgt_lines), strict=True):
        with open(path, "w", encoding="utf-8") as f:
            written, copy = 0, 0
            while written < pairs:
                block = lines[: pairs - written]
                f.write("".join(f"{line} {copy}\n" for line in block))
                written += len(block)
                copy += 1
    return paths


def bench_corpus(
    name: str, tmp: Path, src: Path, tgt: Path, threads: int, tokenizer: Path | None, repeat: int
) -> dict:
    exp = tmp / name
    config = tmp / f"{name}.yaml"
    write_config(config, exp, src, tgt, threads)
    if tokenizer is None:
        subprocess.run([*MTKIT, "tokenizer", "train", "-c", str(config)], check=True, cwd=ROOT, capture_output=True)
    else:
        from mtkit.tokenizer import Tokenizers

        Tokenizers.load(tokenizer).copy_to(exp / "tokenizer")
    # Alternate the two, `repeat` times each: a shared 2-core machine slows single runs by up to
    # a fifth. The ratio is the median over the pairs of neighbouring runs (each pair's is
    # reported); speeds are each one's fastest run.
    runs, spm_runs = [], []
    for _ in range(repeat):
        wall, cpu, rss, tree_rss = run_measured([*MTKIT, "prepare", "-c", str(config)])
        report = json.loads((exp / "data" / "report.json").read_text())
        runs.append((report["seconds"], wall, cpu, rss, tree_rss, report))
        spm_runs.append(bare_encode(exp / "tokenizer" / "spm.model", src, tgt, threads))
    pairs = list(zip(runs, spm_runs, strict=True))
    ratios = [spm[0] / run[0] for run, spm in pairs]
    cpu_ratios = [spm[1] / run[5]["cpu_seconds"] for run, spm in pairs]
    _, wall, cpu, _, _, report = min(runs, key=lambda run: run[0])
    rss, tree_rss = max(run[3] for run in runs), max(run[4] for run in runs)
    spm_seconds, spm_cpu, spm_pairs = min(spm_runs)
    read = report["splits"]["train"]["read"]
    assert spm_pairs == read, (spm_pairs, read)
    result = {
        "pairs": read,
        "kept": report["splits"]["train"]["kept"],
        "prepare_seconds": round(report["seconds"], 3),
        "prepare_cpu_seconds": round(report["cpu_seconds"], 3),
        "prepare_process_wall_seconds": round(wall, 3),
        "prepare_process_cpu_seconds": round(cpu, 3),
        "pairs_per_s": round(read / report["seconds"]),
        "pairs_per_s_wall": round(read / wall),  # with interpreter start-up and imports
        "spm_seconds": round(spm_seconds, 3),
        "spm_cpu_seconds": round(spm_cpu, 3),
        "spm_pairs_per_s": round(spm_pairs / spm_seconds),
        "ratio_vs_spm": round(statistics.median(ratios), 3),
        "ratio_vs_spm_each_run": [round(ratio, 3) for ratio in ratios],
        "ratio_vs_spm_cpu": round(statistics.median(cpu_ratios), 3),
        "peak_rss_mib": round(tree_rss, 1),
        "peak_rss_mib_main_process": round(rss, 1),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Multi30k only (a smoke run).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--threads", type=int, default=1, help="data.num_proc and SentencePiece threads.")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="Size of the large corpus.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each, alternated (the median ratio counts).")
    args = parser.parse_args()
    if not (MULTI30K / "train.en.gz").exists():
        sys.exit(f"bench: {MULTI30K} not found")

    results: dict = {"threads": args.threads, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as tmp_name:
        tmp = Path(tmp_name)
        m30k = bench_corpus(
            "multi30k", tmp, MULTI30K / "train.en.gz", MULTI30K / "train.de.gz", args.threads, None, args.repeat
        )
        results["multi30k"] = m30k
        headline = m30k
        if not args.quick:
            src, tgt = make_large(tmp, args.pairs)
            large = bench_corpus("large", tmp, src, tgt, args.threads, tmp / "multi30k" / "tokenizer", args.repeat)
            results["large"] = large
            headline = large
        results["ratio_vs_spm"] = headline["ratio_vs_spm"]
        results["ratio_vs_spm_cpu"] = headline["ratio_vs_spm_cpu"]
        results["pairs_per_s"] = headline["pairs_per_s"]
        results["peak_rss_mib_1m"] = None if args.quick else results["large"]["peak_rss_mib"]
    if args.json:
        print(json.dumps(results))
        return
    for name in ("multi30k", "large"):
        if name in results:
            r = results[name]
            print(
                f"{name:9} {r['pairs']:>9,} pairs  prepare {r['pairs_per_s']:>8,}/s "
                f"(wall {r['pairs_per_s_wall']:>8,}/s)  spm {r['spm_pairs_per_s']:>8,}/s  "
                f"ratio {r['ratio_vs_spm']:.2f} (cpu {r['ratio_vs_spm_cpu']:.2f})  peak RSS {r['peak_rss_mib']:.0f} MiB"
            )


if __name__ == "__main__":
    main()
