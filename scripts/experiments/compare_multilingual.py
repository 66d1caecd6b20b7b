"""One model or one per pair? Bilingual runs against multilingual runs on Multi30k, compared per
direction with `mtkit compare`.

    python scripts/experiments/compare_multilingual.py [--steps 600] [--seeds 2] [--budgets direction,total]

Arms, each the main recipe (`configs/multi30k_en_de.yaml`: the `small` model, an 8,000-piece
joint vocabulary, so every arm has as many parameters) with other corpora, run by
`mtkit pipeline` (tokenizer, prepare, train, select, translate, score):

- ``bi_en_de``, ``bi_en_fr``: one model per pair;
- ``one_to_many``: one model for en->de and en->fr (a ``<2xx>`` token on the source);
- ``many_to_many``: one model for en<->de and en<->fr (`configs/multi30k_multilingual.yaml`'s
  four directions); its test sets add German<->French, zero-shot.

Budgets: ``direction`` gives a multilingual arm ``--steps`` updates per direction (so as many
updates per direction as a bilingual arm), ``total`` gives it ``--steps`` in all (as much
compute as one bilingual arm). Bilingual arms always train ``--steps``. Each budget ends with
one `mtkit compare` per direction on test_2016_flickr (paired bootstrap against the bilingual
arm of seed 1 where there is one), written as ``compare_BUDGET_SRC-TGT.md``/``.json`` under
``--out``. A finished run is kept (delete its directory to train it again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# benchlib lives beside the benchmarks; this script runs as python scripts/experiments/NAME.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import MTKIT, ROOT, print_result

from mtkit.compare import Options, compare
from mtkit.fileio import atomic_write_text

RECIPE = ROOT / "configs" / "multi30k_en_de.yaml"
DATA = "../shared/data/multi30k"
ARMS: dict[str, list[tuple[str, str]]] = {
    "bi_en_de": [("en", "de")],
    "bi_en_fr": [("en", "fr")],
    "one_to_many": [("en", "de"), ("en", "fr")],
    "many_to_many": [("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en")],
}
ZERO_SHOT = [("de", "fr"), ("fr", "de")]
"""Test directions of the many-to-many arm that no arm trains on."""


def corpus(split: str, src: str, tgt: str, limit: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"format": "text", "src": f"{DATA}/{split}.{src}.gz", "tgt": f"{DATA}/{split}.{tgt}.gz",
                             "src_lang": src, "tgt_lang": tgt}
    return {**entry, "limit": limit} if limit else entry


def arm_config(name: str, run: Path, seed: int, steps: int, limit: int | None) -> dict[str, Any]:
    """The recipe with the arm's corpora, seed and budget, as a config dict."""
    config = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    directions = ARMS[name]
    tests = directions + (ZERO_SHOT if name == "many_to_many" else [])
    config["experiment"] = {"dir": str(run), "seed": seed}
    data = config["data"]
    data["src_lang"], data["tgt_lang"] = directions[0]
    data["train"] = [corpus("train", s, t, limit) for s, t in directions]
    data["valid"] = [corpus("val", s, t, limit) for s, t in directions]
    data["test"] = [corpus("test_2016_flickr", s, t, limit) for s, t in tests]
    config["train"]["max_steps"] = steps
    # Four validations a run whatever its budget, so checkpoint averaging and selection work alike.
    config["train"]["valid_every"] = max(50, steps // 4)
    return config


def run_arm(name: str, seed: int, steps: int, run: Path, limit: int | None, overrides: list[str]) -> Path:
    """Train (or find) the arm's run with `mtkit pipeline` (``overrides``: its ``--set`` items)."""
    run.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    atomic_write_text(path, yaml.safe_dump(arm_config(name, run, seed, steps, limit), sort_keys=False))
    cmd = [*MTKIT, "pipeline", "-c", str(path), *[arg for item in overrides for arg in ("--set", item)]]
    print("compare_multilingual: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="Updates of a bilingual arm (and see --budgets).")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds of every arm.")
    parser.add_argument("--budgets", default="direction,total", help="Comma-separated: direction, total.")
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--limit", type=int, default=None,
                        help="Read at most this many pairs of each corpus (a quick check).")
    parser.add_argument("--speed-sentences", type=int, default=0,
                        help="Test sentences whose decoding `mtkit compare` times (0: none; the arms are one size).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override for every arm (repeatable), e.g. model.size=tiny for a quick check.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "multilingual")
    parser.add_argument("--json", action="store_true", help="Print the comparisons as one JSON object.")
    args = parser.parse_args()

    arms = [arm for arm in args.arms.split(",") if arm]
    budgets = [budget for budget in args.budgets.split(",") if budget]
    if not arms or set(arms) - set(ARMS) or not budgets or set(budgets) - {"direction", "total"}:
        parser.error(f"--arms from {', '.join(ARMS)}; --budgets from direction, total")
    out = args.out.resolve()
    results: dict[str, Any] = {}
    for budget in budgets:
        runs: dict[str, list[Path]] = {}
        for seed in range(1, args.seeds + 1):
            for arm in arms:
                directions = len(ARMS[arm])
                # A bilingual arm is the same run under both budgets.
                steps = args.steps * directions if budget == "direction" else args.steps
                folder = "bilingual" if directions == 1 else budget
                run = run_arm(arm, seed, steps, out / folder / f"{arm}_s{seed}", args.limit, args.overrides)
                runs.setdefault(arm, []).append(run)
        results[budget] = {}
        tested = sorted({d for arm in arms for d in ARMS[arm] + (ZERO_SHOT if arm == "many_to_many" else [])})
        for src, tgt in tested:
            systems = [run for arm in arms for run in runs[arm]
                       if (src, tgt) in ARMS[arm] or arm == "many_to_many" and (src, tgt) in ZERO_SHOT]
            systems.sort(key=lambda run: (len(ARMS[run.name.rsplit("_s", 1)[0]]), run.name))  # bilingual first
            test = (Path(ROOT / DATA / f"test_2016_flickr.{src}.gz"), Path(ROOT / DATA / f"test_2016_flickr.{tgt}.gz"))
            report = compare([str(run) for run in systems], [test],
                             Options(src_lang=src, tgt_lang=tgt, lang=tgt, speed_sentences=args.speed_sentences),
                             log=lambda line: print(line, file=sys.stderr))
            stem = out / f"compare_{budget}_{src}-{tgt}"
            atomic_write_text(stem.with_suffix(".md"), report.markdown())
            atomic_write_text(stem.with_suffix(".json"), json.dumps(report.to_json(), indent=1) + "\n")
            results[budget][f"{src}-{tgt}"] = report.to_json()
            print(f"## {budget} budget, {src}-{tgt}\n\n{report.markdown()}", file=sys.stderr)
    if args.json:
        print_result(results, as_json=True)


if __name__ == "__main__":
    main()
