#!/usr/bin/env python
"""Translation speed and quality: mtkit against Hugging Face ``generate`` and CTranslate2,
on the same weights, measured in one run.

    .venv/bin/python scripts/bench/bench_translate.py [--run RUN_DIR] [--json]
    .venv/bin/python scripts/bench/bench_translate.py --presets --json  # today's blocks against small

Without ``--run`` a post-norm ``small`` model is trained for ``--minutes`` on Multi30k with
the mtkit CLI (into runs/bench_translate). The model is exported to Marian
(``mtkit.export``) and to CTranslate2. Every in-process system translates the same batches
(sources sorted by length, cut into batches of ``--batch``; batch 1 on the first
``--batch1-sentences``) with the same beam size, length penalty (mtkit's ``length`` form, which
is CTranslate2's and Marian's), minimum and maximum lengths, on ``--threads`` CPU threads:

- ``mtkit``: ``Translator.search`` with the PyTorch backend, in process (ids in, ids out);
- ``hf``: Marian ``generate`` (post-norm runs only);
- ``ct2_fp32`` / ``ct2_int8``: bare CTranslate2 ``translate_batch`` on pre-tokenized input, one
  call per batch, ``--threads`` threads within a batch (``intra_threads``); the ``_defaults``
  twins build the translator with CTranslate2's default thread settings; the ``_best`` twins
  with one thread per batch and ``--threads`` batches at once (``inter_threads``, all batches
  submitted together), the setting mtkit's CTranslate2 backend uses on a CPU.

Then mtkit end to end through its CLI (``mtkit translate -i FILE -o FILE``: reading,
tokenizing, translating, detokenizing and writing) on a copy of the checkpoint: its default
(``decode.backend: auto``, ``compute_type: auto``; the line it prints says what it picked), the
PyTorch backend (at ``compute_type: auto``, bfloat16 where the CPU multiplies it natively, and at
float32), and the CTranslate2 backend at float32 and int8. The CLI batches by its own
token budget (``decode.batch_tokens``, the default) in the batch-32 rows, one sentence per batch
(``--batch-tokens 1``) in the batch-1 rows. Each CLI run is timed net of the command's start-up
(imports, loading the model): the same command on an empty file, after a warm-up run that also
makes the conversion and the int8 check, is subtracted.

Reported per system: sentences/s, output tokens/s, peak resident memory while translating (in
process), BLEU against the references, and the share of outputs identical to mtkit's. ``--json``
adds ``default_vs_ct2_fp32`` (mtkit's default CLI over the fastest bare CTranslate2 float32
setting), ``default_bleu_delta`` (its BLEU minus the PyTorch backend's at float32),
``ct2_backend_overhead`` (mtkit's CTranslate2 backend at float32 over the fastest bare float32),
``torch_vs_ct2_fp32`` (the PyTorch backend as ``auto`` sets it up: its worker processes, its
compute type) with ``torch_bleu_delta``, ``torch_fp32_vs_ct2_fp32`` (the PyTorch backend at
float32), and the same at batch 1 (``_b1``). Remaining differences between mtkit's beam search and
CTranslate2's are in ``mtkit.engines.ctranslate2.CT2Translator``'s docstring. Bare CTranslate2 takes one
maximum length per call, so it gets the batch's largest (mtkit: one per sentence).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from benchlib import MTKIT, MULTI30K, ROOT, Clocks, PeakMemory, source_tensor, train_with_cli
from benchlib import random_model as random_transformer

from mtkit.checkpoint import Loaded, load_for_inference, resolve
from mtkit.config import DecodeConfig
from mtkit.engines import open_translator
from mtkit.engines.ctranslate2 import CT2_PREFIX, CT2Translator
from mtkit.export import (
    SPECIAL_PIECES,
    CTranslate2Exporter,
    HuggingFaceExporter,
    export,
    huggingface_generation_config,
)
from mtkit.fileio import read_lines
from mtkit.malloc import keep_freed_memory
from mtkit.score import score
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

IdsFn = Callable[[list[list[int]]], list[list[int]]]


# --------------------------------------------------------------------------- the model


def random_model(run_dir: Path, size: str) -> Loaded:
    """An untrained post-norm model of ``size`` on ``run_dir``'s tokenizer. Its outputs run to
    the maximum length in every system: equal work, a pure speed comparison (BLEU is ~0)."""
    from mtkit.config import validate_config

    base = load_for_inference(run_dir)
    config = validate_config({**base.config.to_dict(), "model": {"size": size, "norm": "post", "dropout": 0.0}})
    model = random_transformer(config.model, base.tokenizers).eval()
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
    train_with_cli(ROOT / "configs" / "multi30k_en_de.yaml", settings)


# --------------------------------------------------------------------------- the systems


def mtkit_system(loaded: Loaded, decode: DecodeConfig) -> IdsFn:
    # The PyTorch engine at float32 in this process: what the other systems are compared with.
    translator = open_translator(loaded, decode.model_copy(update={"backend": "torch", "compute_type": "float32"}))
    return lambda batch: [hyps[0].tokens if hyps else [] for hyps in translator.search(batch)]


def hf_system(model_dir: Path, loaded: Loaded, decode: DecodeConfig, early_stopping: bool | str) -> IdsFn:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    marian = transformers.MarianMTModel.from_pretrained(model_dir).eval()
    generation = huggingface_generation_config(loaded, decode)
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


def ct2_system(model_dir: Path, loaded: Loaded, decode: DecodeConfig, threads: int, compute_type: str) -> IdsFn:
    """Bare CTranslate2, one call per batch; ``threads`` 0: CTranslate2's default thread settings."""
    translator = CT2Translator(model_dir, loaded.tokenizers, decode, intra_threads=threads, exact_lengths=False,
                               compute_type=compute_type)
    return translator.translate_ids


def ct2_concurrent(model_dir: Path, loaded: Loaded, decode: DecodeConfig, threads: int, compute_type: str,
                   name: str, ids: list[list[int]], batch_size: int) -> tuple[Run, list[list[int]]]:
    """Bare CTranslate2 with one thread per batch and ``threads`` batches at once: every batch
    (the same batches as ``measure``'s) submitted together, each with its longest sentence's limit."""
    ct2 = CT2Translator(model_dir, loaded.tokenizers, decode, compute_type=compute_type, intra_threads=1,
                        inter_threads=threads)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    options = dict(beam_size=decode.beam, length_penalty=decode.lenpen, min_decoding_length=decode.min_len,
                   suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]], asynchronous=True)
    sources = [[[ct2.src_pieces[i] for i in ids[r]] for r in rows] for rows in batches]
    limits = [max(ct2.max_length(len(ids[r])) for r in rows) for rows in batches]
    ct2.translator.translate_batch(sources[0], max_decoding_length=limits[0], **options)[0].result()  # warm-up
    start = time.perf_counter()
    pending = [ct2.translator.translate_batch(src, max_decoding_length=limit, **options)
               for src, limit in zip(sources, limits, strict=True)]
    out: list[list[int]] = [[] for _ in ids]
    for rows, results in zip(batches, pending, strict=True):
        for row, result in zip(rows, results, strict=True):
            out[row] = [ct2.tgt_ids[piece] for piece in result.result().hypotheses[0]]
    seconds = time.perf_counter() - start
    tokens = sum(len(h) for h in out)
    return Run(name, batch_size, len(ids), round(seconds, 3), round(len(ids) / seconds, 2),
               round(tokens / seconds, 1)), out


# --------------------------------------------------------------------------- mtkit end to end


def copy_checkpoint(run_dir: Path, into: Path) -> Path:
    """A run directory in ``into`` holding a copy of ``run_dir``'s checkpoint (without its
    CTranslate2 conversions) and its prepared validation split (for ``compute_type: auto``):
    the CLI runs convert into the copy, never into ``run_dir``."""
    checkpoint = resolve(run_dir)
    run = into / "run"
    shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name, ignore=shutil.ignore_patterns(CT2_PREFIX + "*"))
    (run / "checkpoints" / "best").symlink_to(checkpoint.name)
    data = checkpoint.parent.parent / "data"
    if checkpoint.parent.name == "checkpoints" and (data / "valid.arrow").is_file():
        (run / "data").mkdir()
        for name in ("report.json", "valid.arrow"):
            shutil.copyfile(data / name, run / "data" / name)
    return run


@dataclass
class CliRun:
    run: Run
    texts: list[str]
    said: str  # what the command printed on stderr


def mtkit_cli(run: Path, name: str, source: Path, lines: int, batch: int, threads: int, decode: DecodeConfig,
              extra: list[str]) -> CliRun:
    """``mtkit translate -i source -o FILE`` timed net of its start-up: the same command on an
    empty file (the faster of two runs, after a warm-up that makes any conversion and
    compute-type check) is subtracted."""
    out = source.with_name(f"{name}.b{batch}.out")
    empty = source.with_name("empty.txt")
    empty.write_text("")
    settings = [f"--beam={decode.beam}", f"--lenpen={decode.lenpen}", f"--max-len-a={decode.max_len_a}",
                f"--max-len-b={decode.max_len_b}", f"--min-len={decode.min_len}", "--length-penalty-form=length"]
    if batch == 1:
        settings.append("--batch-tokens=1")
    command = [*MTKIT, "translate", "-m", str(run), "--threads", str(threads), *settings, *extra]

    def timed(path: Path) -> tuple[float, str]:
        start = time.perf_counter()
        done = subprocess.run([*command, "-i", str(path), "-o", str(out)], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name}: mtkit translate failed: {done.stderr.strip()}")
        return seconds, done.stderr.strip()

    timed(empty)  # warm-up: conversion, compute-type check, file caches
    startup = min(timed(empty)[0] for _ in range(2))  # the least-disturbed of two
    total, said = timed(source)
    texts = out.read_text(encoding="utf-8").splitlines()
    seconds = max(total - startup, 1e-3)
    return CliRun(Run(name, batch, lines, round(seconds, 3), round(lines / seconds, 2), None,
                      startup_s=round(startup, 2)), texts, said)


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    system: str
    batch: int
    sentences: int
    seconds: float
    sent_per_s: float
    tok_per_s: float | None
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = None
    bleu: float | None = None
    identical_to_mtkit: float | None = None
    startup_s: float | None = None


def measure(systems: dict[str, IdsFn], ids: list[list[int]], batch_size: int,
            ours: tuple[str, ...] = ("mtkit",)) -> dict[str, tuple[Run, list[list[int]]]]:
    """Translate ``ids`` with every system in batches of ``batch_size`` sentences of similar
    length. The systems take turns batch by batch (in rotating order), so that a change in
    the machine's load hits all of them alike. Outputs are in input order. ``ours``: the
    systems that run with mtkit's allocator policy."""
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
                keep_freed_memory(name in ours)  # each with its allocator policy, as it ships
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


# --------------------------------------------------------------------------- the family presets


PRESETS = ["small", "t5_small", "small_decoder_only", "llama_small"]
"""``--presets``: mtkit's default ``small`` and the presets parameter-matched to it."""


def preset_decoding(args: argparse.Namespace) -> dict:
    """Decoding speed of untrained models of each of ``PRESETS`` on one 8,000-piece joint
    tokenizer trained on Multi30k: the PyTorch engine at float32, beam ``--beam``, every output
    exactly ``--preset-length`` tokens (minimum = maximum length, so that the blocks alone
    differ), at batch ``--batch`` and batch 1; with each model's key/value cache per sentence
    (16 source and 16 target tokens, one beam, float32)."""
    from mtkit.config import TokenizerConfig, validate_config
    from mtkit.models import build_model
    from mtkit.tokenizer import train_tokenizers

    with tempfile.TemporaryDirectory(prefix="bench_translate.presets.") as tmp:
        lines = [line or "" for line in read_lines(args.src)][: args.limit]
        train = [line or "" for lang in ("en", "de") for line in read_lines(MULTI30K / f"train.{lang}.gz")]
        tokenizers = train_tokenizers(TokenizerConfig(vocab_size=8000), Path(tmp) / "tokenizer",
                                      lambda sides: iter(train))
        ids = tokenizers.src.encode(lines)
        length = args.preset_length
        decode = DecodeConfig(beam=args.beam, max_len_a=0.0, max_len_b=length, min_len=length, backend="torch",
                              compute_type="float32")
        fns: dict[str, IdsFn] = {}
        cache: dict[str, int] = {}
        for name in PRESETS:
            arch = {"arch": "decoder_only"} if name == "small_decoder_only" else {}
            config = validate_config({"model": {"size": name, "dropout": 0.0, **arch}, "decode": decode.model_dump()})
            torch.manual_seed(0)
            model = build_model(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size, True).eval()
            loaded = Loaded(model=model, config=config, tokenizers=tokenizers, meta={}, path=Path(tmp))
            fns[name] = mtkit_system(loaded, decode)
            cache[name] = kv_cache_bytes(model)
        runs = {}
        for batch_size, subset in ((args.batch, ids), (1, ids[: args.batch1_sentences])):
            if subset:
                for name, (run, _) in measure(fns, subset, batch_size, ours=tuple(PRESETS)).items():
                    runs[name, batch_size] = run
                    print(f"{name:18s} batch {batch_size:3d}: {run.sent_per_s:7.1f} sent/s", file=sys.stderr)
    report: dict = {"presets": {f"{name} batch {batch}": asdict(run) for (name, batch), run in runs.items()},
                    "kv_cache_bytes_per_sentence": cache, "output_tokens": args.preset_length, "beam": args.beam,
                    "threads": args.threads}
    for name, key in (("llama_small", "llama"), ("t5_small", "t5"), ("small_decoder_only", "decoder_only")):
        report[f"{key}_decode_vs_small"] = runs[name, args.batch].sent_per_s / runs["small", args.batch].sent_per_s
        if (name, 1) in runs:
            report[f"{key}_decode_vs_small_b1"] = runs[name, 1].sent_per_s / runs["small", 1].sent_per_s
    return report


def kv_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes of the key/value cache (``state.nbytes``) for one 16-token source (EOS included)
    after 16 target tokens, one beam, float32."""
    src = torch.full((1, 16), 5)
    src[0, -1] = EOS_ID
    with torch.no_grad():
        state = model.encode(src)
        model.decode_step(torch.tensor([[BOS_ID] + [5] * 15]), state)
    return state.nbytes


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="Trained run or checkpoint (post-norm, for the HF comparison).")
    parser.add_argument("--minutes", type=float, default=3,
                        help="Training budget when no --run is given (the default run aims at 10 minutes on 2 cores).")
    parser.add_argument("--src", type=Path, default=MULTI30K / "test_2016_flickr.en.gz")
    parser.add_argument("--ref", type=Path, default=MULTI30K / "test_2016_flickr.de.gz")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=None, help="Length-penalty alpha (default: the run's).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch1-sentences", type=int, default=50, help="Sentences for the batch-1 runs (0: skip).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N test sentences.")
    parser.add_argument("--hf-early-stopping", default="never", choices=["true", "false", "never"],
                        help="generate()'s early_stopping ('never' searches as exhaustively as mtkit).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "ct2_fp32", "ct2_int8", "cli"])
    parser.add_argument("--random", metavar="SIZE", choices=["tiny", "small", "base"],
                        help="Benchmark an untrained post-norm model of this size instead (speed only).")
    parser.add_argument("--profile", action="store_true", help="Print mtkit's top operators to stderr.")
    parser.add_argument("--presets", action="store_true",
                        help="Only time untrained models of small and its family presets (t5_small, "
                             "small_decoder_only, llama_small): keys llama_decode_vs_small and the like.")
    parser.add_argument("--preset-length", type=int, default=20, help="Output tokens per sentence with --presets.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args()
    if args.presets:
        torch.set_num_threads(args.threads)
        report = preset_decoding(args)
        print(json.dumps(report) if args.json else json.dumps(report, indent=1))
        return

    torch.set_num_threads(args.threads)
    run_dir = args.run
    if run_dir is None:
        run_dir = ROOT / "runs" / "bench_translate"
        if not (run_dir / "checkpoints").is_dir():
            train_quick_model(run_dir, args.minutes)
    loaded = random_model(run_dir, args.random) if args.random else load_for_inference(run_dir)
    decode = loaded.config.decode.model_copy(update={"beam": args.beam, "nbest": 1, "sampling": False,
                                                     "length_penalty_form": "length"})
    if args.lenpen is not None:
        decode = decode.model_copy(update={"lenpen": args.lenpen})

    lines = [line or "" for line in read_lines(args.src)][: args.limit]
    refs = [line or "" for line in read_lines(args.ref)][: args.limit]
    ids = loaded.tokenizers.src.encode(lines)
    detok = loaded.tokenizers.tgt.decode
    tgt_lang = loaded.config.data.tgt_lang

    texts: dict[tuple[str, int], list[str]] = {}  # what the CLI wrote, as written
    with tempfile.TemporaryDirectory(prefix="bench_translate.") as tmp:
        systems: dict[str, Callable[[], IdsFn]] = {"mtkit": lambda: mtkit_system(loaded, decode)}
        if "hf" not in args.skip and loaded.config.model.norm == "post":
            export(HuggingFaceExporter(), loaded, Path(tmp) / "hf")
            early = {"true": True, "false": False}.get(args.hf_early_stopping, args.hf_early_stopping)
            systems["hf"] = lambda: hf_system(Path(tmp) / "hf", loaded, decode, early)
        # One float32 conversion serves both precisions: CTranslate2 quantizes when it loads.
        model_dir = Path(tmp) / "ct2"
        export(CTranslate2Exporter(), loaded, model_dir)
        bare = [(f"ct2_{short}", compute_type) for short, compute_type in (("fp32", "float32"), ("int8", "int8"))
                if f"ct2_{short}" not in args.skip]
        for name, compute_type in bare:
            systems[name] = functools.partial(ct2_system, model_dir, loaded, decode, args.threads, compute_type)
            systems[f"{name}_defaults"] = functools.partial(ct2_system, model_dir, loaded, decode, 0, compute_type)

        runs: list[Run] = []
        outputs: dict[tuple[str, int], list[list[int]]] = {}
        fns = {name: build() for name, build in systems.items()}
        sizes = [(args.batch, ids), (1, ids[: args.batch1_sentences])]
        for batch_size, subset in sizes:
            if not subset:
                continue
            measured = measure(fns, subset, batch_size)
            for name, compute_type in bare:
                measured[f"{name}_best"] = ct2_concurrent(model_dir, loaded, decode, args.threads, compute_type,
                                                          f"{name}_best", subset, batch_size)
            for name, (run, out) in measured.items():
                outputs[name, batch_size] = out
                runs.append(run)
                print(f"{name:17s} batch {batch_size:3d}: {run.sent_per_s:7.1f} sent/s", file=sys.stderr)
        profile_table = profile_mtkit(fns["mtkit"], ids, args.batch) if args.profile else ""
        del fns

        said: dict[int, str] = {}
        if "cli" not in args.skip and not args.random:
            copy = copy_checkpoint(run_dir, Path(tmp))
            backends = {
                "mtkit_default": [],
                "mtkit_torch": ["--backend=torch"],
                "mtkit_torch_fp32": ["--backend=torch", "--compute-type=float32"],
                "mtkit_ct2_fp32": ["--backend=ctranslate2", "--compute-type=float32"],
                "mtkit_ct2_int8": ["--backend=ctranslate2", "--compute-type=int8"],
            }
            for batch_size, subset in sizes:
                if not subset:
                    continue
                source = Path(tmp) / f"source.{len(subset)}.txt"
                source.write_text("".join(line + "\n" for line in lines[: len(subset)]), encoding="utf-8")
                for name, extra in backends.items():
                    cli = mtkit_cli(copy, name, source, len(subset), batch_size, args.threads, decode, extra)
                    if name == "mtkit_default":
                        said[batch_size] = cli.said
                    cli_tokens = loaded.tokenizers.tgt.encode(cli.texts)
                    cli.run.tok_per_s = round(sum(len(t) for t in cli_tokens) / cli.run.seconds, 1)
                    outputs[name, batch_size] = cli_tokens
                    texts[name, batch_size] = cli.texts
                    runs.append(cli.run)
                    print(f"{name:17s} batch {batch_size:3d}: {cli.run.sent_per_s:7.1f} sent/s", file=sys.stderr)

    for run in runs:
        hyps = texts.get((run.system, run.batch)) or detok(outputs[run.system, run.batch])
        run.bleu = round(score(hyps, [refs[: len(hyps)]], metrics=("bleu",), tgt_lang=tgt_lang)[0].score, 2)
        ours = detok(outputs["mtkit", run.batch])
        theirs = hyps
        run.identical_to_mtkit = round(sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours), 4)

    report = summary(runs, args, decode, run_dir, said)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(runs, report)
    if profile_table:
        print(profile_table, file=sys.stderr)


def summary(runs: list[Run], args: argparse.Namespace, decode: DecodeConfig, run_dir: Path,
            said: dict[int, str]) -> dict:
    by = {(r.system, r.batch): r for r in runs}
    ours = by["mtkit", args.batch]

    def ratio(system: str, batch: int = args.batch) -> float | None:
        other = by.get((system, batch))
        return round(by["mtkit", batch].sent_per_s / other.sent_per_s, 3) if other else None

    def bleu(system: str) -> float | None:
        other = by.get((system, args.batch))
        return other.bleu if other else None

    def fastest(prefix: str, batch: int) -> Run | None:
        """The fastest bare CTranslate2 thread setting of one precision."""
        found = [r for r in runs if r.batch == batch and r.system.startswith(prefix)]
        return max(found, key=lambda r: r.sent_per_s) if found else None

    def over(system: str, base: Run | None, batch: int) -> float | None:
        run = by.get((system, batch))
        return round(run.sent_per_s / base.sent_per_s, 3) if run and base else None

    def delta(system: str, batch: int) -> float | None:
        run, torch_run = by.get((system, batch)), by.get(("mtkit_torch_fp32", batch))
        if run is None or torch_run is None or run.bleu is None or torch_run.bleu is None:
            return None
        return round(run.bleu - torch_run.bleu, 2)

    keys: dict[str, object] = {}
    for batch, suffix in ((args.batch, ""), (1, "_b1")):
        base = fastest("ct2_fp32", batch)
        keys[f"default_vs_ct2_fp32{suffix}"] = over("mtkit_default", base, batch)
        keys[f"default_bleu_delta{suffix}"] = delta("mtkit_default", batch)
        keys[f"ct2_backend_overhead{suffix}"] = over("mtkit_ct2_fp32", base, batch)
        keys[f"torch_vs_ct2_fp32{suffix}"] = over("mtkit_torch", base, batch)
        keys[f"torch_fp32_vs_ct2_fp32{suffix}"] = over("mtkit_torch_fp32", base, batch)
        keys[f"torch_bleu_delta{suffix}"] = delta("mtkit_torch", batch)
        keys[f"ct2_fp32_baseline{suffix}"] = base.system if base else None
    return {
        **keys,
        "default_backend": said.get(args.batch),
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
            "beam": decode.beam, "lenpen": decode.lenpen, "length_penalty_form": decode.length_penalty_form,
            "max_len_a": decode.max_len_a, "max_len_b": decode.max_len_b, "min_len": decode.min_len,
            "batch": args.batch, "threads": args.threads, "sentences": ours.sentences,
            "batch1_sentences": by["mtkit", 1].sentences if ("mtkit", 1) in by else 0,
            "hf_early_stopping": args.hf_early_stopping, "torch": torch.__version__,
            "ctranslate2": _version("ctranslate2"),
            "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        },
        "runs": [asdict(r) for r in runs],
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def print_table(runs: list[Run], report: dict) -> None:
    header = f"{'system':17s} {'batch':>5s} {'sent':>5s} {'sent/s':>8s} {'tok/s':>8s} {'peak MB':>8s} " \
             f"{'+MB':>6s} {'BLEU':>6s} {'same as mtkit':>13s}"
    print(header)

    def cell(value: float | None, width: int, digits: int = 1) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

    for r in runs:
        print(f"{r.system:17s} {r.batch:5d} {r.sentences:5d} {r.sent_per_s:8.1f} {cell(r.tok_per_s, 8)} "
              f"{cell(r.peak_rss_mb, 8)} {cell(r.rss_growth_mb, 6)} {cell(r.bleu, 6, 2)} "
              f"{r.identical_to_mtkit:13.1%}")
    keys = ("speedup_vs_hf", "ratio_vs_ct2_fp32", "ratio_vs_ct2_int8")
    print("batch {}: ".format(report["settings"]["batch"]) + ", ".join(f"{k} {report[k]}" for k in keys))
    print("batch 1: " + ", ".join(f"{k} {report['batch1'][k]}" for k in keys))
    issue = ("default_vs_ct2_fp32", "default_bleu_delta", "ct2_backend_overhead", "torch_vs_ct2_fp32",
             "torch_bleu_delta", "torch_fp32_vs_ct2_fp32")
    for suffix in ("", "_b1"):
        print(", ".join(f"{k}{suffix} {report[k + suffix]}" for k in issue)
              + f" (baseline: {report['ct2_fp32_baseline' + suffix]})")
    print(f"default: {report['default_backend']}")
    print("settings: " + json.dumps(report["settings"]))


if __name__ == "__main__":
    main()
