"""Encoder-decoder or decoder-only? Train the arms on one corpus and compare them with `mtkit compare`.

    python scripts/experiments/compare_architectures.py [--minutes 10] [--seeds 2] [--budgets time,updates]

Arms (configs/multi30k_en_de.yaml and configs/multi30k_en_de_decoder_only.yaml, which differ
only in the model section):

- ``encdec``: the encoder-decoder recipe (``small``, 3+3 layers);
- ``prefix_lm``: the decoder-only prefix LM matched in non-embedding parameters (7 blocks),
  target positions continuing after the source;
- ``causal_lm``: the same with causal attention over the source (a plain language model);
- ``prefix_lm_layers``: the prefix LM matched in layers (6 blocks);
- ``prefix_lm_restart`` (only when named in ``--arms``): the prefix LM with target positions
  restarting at 0, the decoder-only recipe's layout.

With today's blocks (``--arms today``: ``encdec`` and the four below, parameter-matched):

- ``encdec_today``: the encoder-decoder recipe with Llama's blocks (RMSNorm, rotary positions,
  SwiGLU, no biases);
- ``t5``: the recipe with ``model.size: t5_small`` (RMSNorm, relative bias, GeGLU, no biases);
- ``llama_prefix_lm`` / ``llama_causal_lm``: the decoder-only recipe with ``model.size:
  llama_small`` (7 blocks, grouped-query attention), target positions restarting at 0.

The main pairs (encdec and prefix_lm; encdec_today and llama_prefix_lm) and prefix_lm_restart
run ``--seeds`` seeds, the others one. Two budgets:
``time`` (every arm trains ``--minutes`` of wall-clock time) and ``updates`` (every arm makes
``--steps`` updates; by default as many as the seed-1 encoder-decoder made in its time
budget, so that the two budgets separate cost per update from what an update buys). Each
budget ends with ``mtkit compare``'s report of its runs on the test set (``compare_BUDGET.md``
and ``.json`` under ``--out``), the encoder-decoder of seed 1 first, so every p-value is
against it.

The arms share one tokenizer and one prepared corpus (made once, copied into each run). A
run that finished before is kept (delete its directory to train it again), so an interrupted
experiment goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# benchlib lives beside the benchmarks; this script runs as python scripts/experiments/NAME.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import MTKIT, ROOT, print_result, sets

from mtkit.compare import Options, compare
from mtkit.fileio import atomic_write_text

ENCDEC = "configs/multi30k_en_de.yaml"
DECODER_ONLY = "configs/multi30k_en_de_decoder_only.yaml"
# The decoder-only arms continue their target positions after the source (the default when
# the experiment ran); prefix_lm_restart is the recipe's layout since (docs/architectures.md).
CONTINUE = {"model.target_positions": "continue"}
# The encoder-decoder with Llama's blocks: RMSNorm, rotary positions, SwiGLU (two thirds of
# the feed-forward width: as many parameters), no biases.
TODAY = {"model.norm_type": "rms", "model.positions": "rope", "model.activation": "swiglu", "model.ffn_dim": "680",
         "model.bias": "false"}
ARMS: dict[str, tuple[str, dict[str, str]]] = {
    "encdec": (ENCDEC, {}),
    "prefix_lm": (DECODER_ONLY, CONTINUE),
    "causal_lm": (DECODER_ONLY, {"model.source_attention": "causal", **CONTINUE}),
    "prefix_lm_layers": (DECODER_ONLY, {"model.size": "small_decoder_only_layers", **CONTINUE}),
    "prefix_lm_restart": (DECODER_ONLY, {"model.target_positions": "restart"}),
    # Today's blocks (docs/architectures.md, "Blocks"), parameter-matched to the arms above.
    "encdec_today": (ENCDEC, TODAY),
    "t5": (ENCDEC, {"model.size": "t5_small"}),
    "llama_prefix_lm": (DECODER_ONLY, {"model.size": "llama_small", "model.target_positions": "restart"}),
    "llama_causal_lm": (DECODER_ONLY, {"model.size": "llama_small", "model.source_attention": "causal",
                                       "model.target_positions": "restart"}),
}
DEFAULT_ARMS = ("encdec", "prefix_lm", "causal_lm", "prefix_lm_layers")  # the positions arm on request
TODAY_ARMS = ("encdec", "encdec_today", "t5", "llama_prefix_lm", "llama_causal_lm")  # --arms today
SEEDED = ("encdec", "prefix_lm", "prefix_lm_restart", "encdec_today", "llama_prefix_lm")  # the main pairs
SHARED_DIRS = ("tokenizer", "data")


def mtkit(*args: str) -> None:
    cmd = [*MTKIT, *args]
    print("compare_architectures: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare_once(out: Path) -> Path:
    """Tokenizer and prepared corpus, made once from the encoder-decoder config."""
    shared = out / "shared"
    if not (shared / "data" / "report.json").exists():
        mtkit("tokenizer", "train", "-c", ENCDEC, "--set", f"experiment.dir={shared}")
        mtkit("prepare", "-c", ENCDEC, "--set", f"experiment.dir={shared}")
    return shared


def updates_made(run: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return max(steps, default=0)


def train_arm(name: str, seed: int, budget: dict[str, object], run: Path, shared: Path) -> Path:
    done = run / ".trained"
    if done.exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for sub in SHARED_DIRS:
        shutil.copytree(shared / sub, run / sub)
    config, overrides = ARMS[name]
    mtkit("train", "-c", config, *sets({"experiment.dir": run, "experiment.seed": seed, **overrides, **budget}))
    done.write_text(json.dumps({"arm": name, "seed": seed, **{k: str(v) for k, v in budget.items()}}) + "\n")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="Training budget of the `time` arms.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Updates of the `updates` arms (default: what encdec seed 1 made in --minutes).")
    parser.add_argument("--seeds", type=int, default=2,
                        help="Seeds of the main pair (encdec, prefix_lm) and of prefix_lm_restart.")
    parser.add_argument("--budgets", default="time,updates", help="Comma-separated: time, updates.")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help="Comma-separated subset of: " + ", ".join(ARMS) + " (default: the four 2017-block "
                             "arms), or `today`: " + ", ".join(TODAY_ARMS))
    parser.add_argument("--test", nargs=2, metavar=("SRC", "REF"),
                        default=["../shared/data/multi30k/test_2016_flickr.en.gz",
                                 "../shared/data/multi30k/test_2016_flickr.de.gz"])
    parser.add_argument("--speed-sentences", type=int, default=256,
                        help="Test sentences whose decoding is timed per run (`mtkit compare --speed-sentences`).")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "architectures")
    parser.add_argument("--json", action="store_true", help="Print the comparisons as one JSON object.")
    args = parser.parse_args()

    arms = list(TODAY_ARMS) if args.arms == "today" else [arm for arm in args.arms.split(",") if arm]
    unknown = sorted(set(arms) - set(ARMS))
    budgets = [b for b in args.budgets.split(",") if b]
    if unknown or not arms or not set(budgets) <= {"time", "updates"} or not budgets:
        parser.error(f"--arms from {', '.join(ARMS)}; --budgets from time, updates")
    out = args.out.resolve()
    shared = prepare_once(out)
    # Seed by seed: every arm has its first seed before any has its second.
    plan = sorted(((arm, seed) for arm in arms for seed in range(1, (args.seeds if arm in SEEDED else 1) + 1)),
                  key=lambda run: (run[1], arms.index(run[0])))

    results = {}
    steps = args.steps
    for budget_name in budgets:
        if budget_name == "time":
            budget: dict[str, object] = {"train.max_minutes": args.minutes, "train.max_steps": 100000}
        else:
            if steps is None:
                reference = out / "time" / "encdec_s1"
                if not (reference / ".trained").exists():
                    parser.error("--steps is needed without the time budget's encdec seed-1 run")
                steps = updates_made(reference)
            budget = {"train.max_minutes": "null", "train.max_steps": steps}
        runs = [train_arm(arm, seed, budget, out / budget_name / f"{arm}_s{seed}", shared) for arm, seed in plan]
        report = compare([str(run) for run in runs], [(Path(args.test[0]), Path(args.test[1]))],
                         Options(speed_sentences=args.speed_sentences), log=lambda line: print(line, file=sys.stderr))
        stem = out / f"compare_{budget_name}"
        atomic_write_text(stem.with_suffix(".md"), report.markdown())
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n")
        results[budget_name] = {"budget": {k: str(v) for k, v in budget.items()}, "compare": report.to_json()}
        print(f"## {budget_name} budget\n\n{report.markdown()}", file=sys.stderr)
    if args.json:
        print_result(results, as_json=True)


if __name__ == "__main__":
    main()
