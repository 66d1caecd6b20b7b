"""The main recipe under several budgets and variants: does more compute ever score lower, and
what does a change (subword regularisation, dropout, ...) buy?

    python scripts/experiments/recipe_budget.py --steps 2000,4000,8000 \
        --arm base --arm sr0.5:train.subword_alpha=0.5 [--jobs 2]

Each (arm, budget) is a whole ``mtkit pipeline`` run of ``configs/multi30k_en_de.yaml`` in its
own directory under ``--out``: training with the given overrides, the select stage (best, last
or the average, by chrF on the whole validation set), the test translation and its score. A
budget is a number of updates (``--steps``: the schedule's cool-down then runs by updates, so
the result does not depend on the machine's speed) or of minutes (``--minutes``). All runs share
one tokenizer and one prepared corpus (made once into ``--out``/shared; each run's pipeline, which
has no stamps for them, makes them again, identically: SentencePiece training is deterministic
for one sentencepiece release). ``--jobs N`` trains N runs at once, one torch
thread each (each run's result is the same as alone: only its duration changes). A finished run
is kept and an interrupted one resumes (the pipeline's own resume: exact, from its last
checkpoint), so an interrupted sweep goes on where it stopped.

Choose between arms on the validation columns; the test columns are for reporting afterwards.
With two or more budgets, each run's test BLEU is also set against the next-shorter budget of its
arm in sacrebleu's paired bootstrap (the difference and its p-value): does more compute score
lower by more than the test set's sampling noise? Prints a Markdown table (also written to
``--out``/budget.md and .json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# benchlib lives beside the benchmarks; this script runs as python scripts/experiments/NAME.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import MTKIT, ROOT, print_result, sets

from mtkit.fileio import atomic_write_text
from mtkit.score import compare, read_text

RECIPE = "configs/multi30k_en_de.yaml"
SHARED_DIRS = ("tokenizer", "data")
# One decoder for every run's test translation, so that arms differ only in what they trained.
FIXED_DECODE = {"decode.backend": "torch", "decode.compute_type": "float32"}


def mtkit(args: list[str], log: Path | None = None) -> None:
    print("recipe_budget: " + " ".join(["mtkit", *args]), file=sys.stderr)
    with open(log or "/dev/null", "a") as out:
        subprocess.run([*MTKIT, *args], check=True, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:key=value,key=value``."""
    name, _, rest = text.partition(":")
    overrides = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, overrides


def run_one(config: str, run: Path, shared: Path, overrides: dict[str, str]) -> dict:
    report = run / "report.json"
    if not report.exists():
        if not (run / "stages").exists():  # a new run; a started one resumes where it stopped
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            for sub in SHARED_DIRS:
                shutil.copytree(shared / sub, run / sub)
        mtkit(["pipeline", "-c", config, *sets({"experiment.dir": str(run), **overrides})], run / "pipeline.log")
    data = json.loads(report.read_text())
    sel = data["selection"]
    chosen = sel["candidates"][sel["chosen"]]
    return {
        "updates": sel["updates"], "chosen": sel["chosen"], "step": sel["step"],
        "train_minutes": round(data["train_seconds"] / 60, 1),
        "valid_bleu": round(chosen["bleu"], 2), "valid_chrf": round(chosen["chrf"], 2), "valid_loss": chosen["loss"],
        "test_bleu": data["test"]["bleu"], "test_chrf": data["test"]["chrf"],
    }


def against_shorter(rows: list[dict], out: Path) -> None:
    """Each row's test BLEU against the previous budget of its arm (paired bootstrap): the columns
    ``test_delta`` and ``test_p`` (None for an arm's first budget)."""
    previous: dict[str, dict] = {}
    for row in rows:
        row["test_delta"] = row["test_p"] = None
        prev = previous.get(row["arm"])
        previous[row["arm"]] = row
        if prev is None:
            continue
        [a_hyp], [b_hyp] = (sorted((out / f"{r['arm']}_{r['budget']}" / "translations").glob("test.hyp.*"))
                            for r in (prev, row))
        [ref] = sorted(a_hyp.parent.glob("test.ref.*"))
        result = compare([(prev["budget"], read_text(a_hyp)), (row["budget"], read_text(b_hyp))],
                         [read_text(ref)], ["bleu"])
        (_, base, *_), (_, score, _, _, p) = result.rows["BLEU"]
        row["test_delta"], row["test_p"] = round(score - base, 2), p


def vs_shorter(row: dict) -> str:
    return "" if row["test_p"] is None else f"{row['test_delta']:+.2f} ({row['test_p']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--steps", help="Comma-separated budgets in updates, e.g. 2000,4000,8000.")
    group.add_argument("--minutes", help="Comma-separated budgets in minutes of training, e.g. 10,20,40.")
    parser.add_argument("--arm", action="append", default=[],
                        help="NAME or NAME:key=value,key=value (repeatable; default: the recipe as it is).")
    parser.add_argument("--config", default=RECIPE, help="The recipe (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="Runs trained at once (one torch thread each when > 1).")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "budget")
    parser.add_argument("--json", action="store_true", help="Print the table as one JSON object.")
    args = parser.parse_args()

    arms = [parse_arm(a) for a in args.arm] or [("base", {})]
    if args.steps:
        budgets = [(f"{int(s)}u", {"train.max_steps": str(int(s)), "train.max_minutes": "null"})
                   for s in args.steps.split(",")]
    else:
        budgets = [(f"{float(m):g}min", {"train.max_minutes": str(float(m)), "train.max_steps": "100000"})
                   for m in args.minutes.split(",")]
    out = args.out.resolve()
    shared = out / "shared"
    if not (shared / "data" / "report.json").exists():
        mtkit(["tokenizer", "train", "-c", args.config, "--set", f"experiment.dir={shared}"])
        mtkit(["prepare", "-c", args.config, "--set", f"experiment.dir={shared}"])

    threads = {"train.threads": "1"} if args.jobs > 1 else {}
    plan = [(arm, budget, {"experiment.seed": str(args.seed), **FIXED_DECODE, **threads, **overrides, **limits})
            for arm, overrides in arms for budget, limits in budgets]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda p: run_one(args.config, out / f"{p[0]}_{p[1]}", shared, p[2]), plan))

    rows = [{"arm": arm, "budget": budget, **r} for (arm, budget, _), r in zip(plan, results, strict=True)]
    against_shorter(rows, out)
    lines = ["| arm | budget | updates | chosen (step) | train min | valid BLEU | valid chrF | valid loss "
             "| test BLEU | test chrF | test BLEU vs shorter (p) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['budget']} | {r['updates']} | {r['chosen']} ({r['step']}) | {r['train_minutes']} "
              f"| {r['valid_bleu']} | {r['valid_chrf']} | {r['valid_loss']} | {r['test_bleu']} | {r['test_chrf']} "
              f"| {vs_shorter(r)} |" for r in rows]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "budget.md", table)
    atomic_write_text(out / "budget.json", json.dumps({"rows": rows}, indent=2) + "\n")
    if args.json:
        print_result({"rows": rows}, True)
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
