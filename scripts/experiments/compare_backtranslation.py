"""Back-translation in a low-resource simulation on Multi30k: beam, sampled and tagged
back-translation against none, compared with `mtkit compare`.

    python scripts/experiments/compare_backtranslation.py [--real 5000] [--steps 600] [--seeds 2]

The data: the first ``--real`` pairs of Multi30k train (English-German) are the parallel data;
the German side of the rest (never its English) is the monolingual text. Every model is the
main recipe (`configs/multi30k_en_de.yaml`: the `small` model) with a ``--vocab``-piece joint
vocabulary (8,000 is more than 5,000 pairs hold), ``--steps`` updates and four validations,
run by `mtkit pipeline`:

1. the reverse model, German to English, on the real pairs (seed 1, ``--reverse-steps``);
2. `mtkit backtranslate` of the monolingual German with it, once per method: ``beam`` (its
   beam search), ``sampling`` (one unrestricted sample a line at temperature 1, as Edunov et
   al. 2018), and ``beam`` again with the tag ``<BT>`` on every synthetic source (Caswell et al.
   2019);
3. the forward arms, English to German, for each seed: ``none`` (the real pairs alone) and
   ``beam``, ``sampling``, ``tagged`` (the real pairs, counted ``--real-weight`` times an epoch,
   and the synthetic ones, once).

Then one `mtkit compare` on test_2016_flickr, with the paired bootstrap against ``none`` of
seed 1, written as ``compare.md``/``compare.json`` under ``--out``. A finished run or
back-translation is kept (delete its directory to make it again).
"""

from __future__ import annotations

import argparse
import gzip
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
DATA = ROOT / ".." / "shared" / "data" / "multi30k"
TAG = "<BT>"
METHODS = {"beam": ("beam", None), "sampling": ("sampling", None), "tagged": ("beam", TAG)}
"""Forward arm -> (backtranslate --method, --tag)."""


def corpus(split: str, src: str, tgt: str, **extra: Any) -> dict[str, Any]:
    return {"format": "text", "src": str(DATA / f"{split}.{src}.gz"), "tgt": str(DATA / f"{split}.{tgt}.gz"), **extra}


def config(run: Path, seed: int, steps: int, vocab: int, src: str, tgt: str, train: list[dict[str, Any]]) -> Path:
    """The recipe for ``src``->``tgt`` on ``train``, written beside ``run``."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["experiment"] = {"dir": str(run), "seed": seed}
    data = recipe["data"]
    data.update(src_lang=src, tgt_lang=tgt, train=train, valid=corpus("val", src, tgt),
                test=corpus("test_2016_flickr", src, tgt))
    recipe["tokenizer"]["vocab_size"] = vocab
    if any(TAG in str(entry.get("src", "")) for entry in train):
        recipe["tokenizer"]["user_symbols"] = [TAG]
    recipe["train"].update(max_steps=steps, valid_every=max(50, steps // 4))
    run.parent.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


def mtkit(*args: str) -> None:
    print("compare_backtranslation: mtkit " + " ".join(args), file=sys.stderr)
    subprocess.run([*MTKIT, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def monolingual(out: Path, real: int, limit: int | None) -> Path:
    """The German side of Multi30k train after the first ``real`` lines (at most ``limit``)."""
    path = out / "data" / "monolingual.de"
    if not path.exists():
        lines = gzip.decompress((DATA / "train.de.gz").read_bytes()).decode("utf-8").splitlines(keepends=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(lines[real:][:limit]))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=5000, help="Parallel pairs (the rest is monolingual German).")
    parser.add_argument("--steps", type=int, default=600, help="Updates of every forward arm.")
    parser.add_argument("--reverse-steps", type=int, default=600, help="Updates of the reverse (de->en) model.")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds of every forward arm.")
    parser.add_argument("--monolingual", type=int, default=None,
                        help="At most this many monolingual lines (default: all the rest; a quick check).")
    parser.add_argument("--vocab", type=int, default=4000, help="Joint vocabulary of every model.")
    parser.add_argument("--real-weight", type=float, default=2.0,
                        help="Times an epoch counts the real pairs in a back-translation arm.")
    parser.add_argument("--arms", default="none," + ",".join(METHODS), help="Comma-separated subset of: none, "
                        + ", ".join(METHODS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override for every model (repeatable), e.g. model.size=tiny for a quick check.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "backtranslation")
    parser.add_argument("--json", action="store_true", help="Print the comparison as one JSON object.")
    args = parser.parse_args()
    arms = [arm for arm in args.arms.split(",") if arm]
    if not arms or set(arms) - {"none", *METHODS}:
        parser.error("--arms from none, " + ", ".join(METHODS))
    out = args.out.resolve()
    sets = [arg for item in args.overrides for arg in ("--set", item)]
    real = [corpus("train", "en", "de", limit=args.real)]

    reverse = out / "reverse_de_en"
    mtkit("pipeline", "-c", str(config(reverse, 1, args.reverse_steps, args.vocab, "de", "en",
                                        [corpus("train", "de", "en", limit=args.real)])), *sets)
    mono = monolingual(out, args.real, args.monolingual)
    synthetic: dict[str, Path] = {}
    for arm in arms:
        if arm == "none":
            continue
        method, tag = METHODS[arm]
        synthetic[arm] = out / "synthetic" / arm
        if not (synthetic[arm] / "report.json").exists():
            mtkit("backtranslate", "-m", str(reverse), "-i", str(mono), "-o", str(synthetic[arm]), "--method", method,
                  *(["--top-k", "0", "--temperature", "1.0"] if method == "sampling" else []),
                  *(["--tag", tag] if tag else []), "--seed", "1")

    runs: list[Path] = []
    for seed in range(1, args.seeds + 1):
        for arm in arms:
            train = list(real)
            if arm != "none":
                train = [{**real[0], "weight": args.real_weight},
                         {"format": "text", "src": str(synthetic[arm] / "synthetic.en"),
                          "tgt": str(synthetic[arm] / "synthetic.de")}]
            run = out / f"{arm}_s{seed}"
            mtkit("pipeline", "-c", str(config(run, seed, args.steps, args.vocab, "en", "de", train)), *sets)
            runs.append(run)
    runs.sort(key=lambda run: (run.name.rsplit("_s", 1)[0] != "none", run.name))  # the baseline first
    test = (DATA / "test_2016_flickr.en.gz", DATA / "test_2016_flickr.de.gz")
    options = Options(src_lang="en", tgt_lang="de", lang="de", speed_sentences=0)
    report = compare([str(run) for run in runs], [test], options, log=lambda line: print(line, file=sys.stderr))
    atomic_write_text(out / "compare.md", report.markdown())
    atomic_write_text(out / "compare.json", json.dumps(report.to_json(), indent=1) + "\n")
    print(report.markdown(), file=sys.stderr)
    if args.json:
        print_result(report.to_json(), as_json=True)


if __name__ == "__main__":
    main()
