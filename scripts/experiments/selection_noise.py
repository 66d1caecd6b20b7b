"""How reliable is each checkpoint-selection criterion? A paired bootstrap on the validation set.

Two steps, so that the decoding can run where a GPU is and the analysis anywhere:

    python scripts/experiments/selection_noise.py decode RUN_DIR stats.json [--average 2 3 4] [--device cuda]
    python scripts/experiments/selection_noise.py analyse stats.json [--subset 300] [--samples 1000]

``decode`` translates the whole validation split of ``RUN_DIR`` (its prepared
``data/valid.arrow``) with every step checkpoint the run kept, and with the average of its
last K step checkpoints for each K of ``--average``, exactly as training's validation does
(``mtkit.translate.Translator``, the run's decode settings), and stores per sentence the
sufficient statistics of BLEU and chrF and the NLL and token count of the reference. The test
set is never read.

``analyse`` resamples the validation sentences ``--samples`` times (the same resample for
every checkpoint: a paired bootstrap) and reports, for each criterion (BLEU on the first
``--subset`` sentences, as training used to select; BLEU, chrF and loss on all of them):
its standard error, the median difference between successive checkpoints in units of that
standard error, and how often the resampled criterion picks the checkpoint that it picks on
the full set (selection stability); and, choosing on resampled sentences, how much whole-set BLEU and chrF
the choice loses against the best checkpoint (regret). A criterion whose differences between
checkpoints are large against its noise, and whose choice loses little, does not pick noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def decode(run_dir: Path, out: Path, averages: list[int], device: str) -> None:
    import torch
    from sacrebleu.metrics import BLEU, CHRF

    from mtkit.checkpoint import average_checkpoints, load_for_inference, step_checkpoints
    from mtkit.data import load_split
    from mtkit.translate import Translator
    from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

    valid = load_split(run_dir, "valid")
    sources, references = list(valid["src"]), list(valid["tgt"])
    steps = step_checkpoints(run_dir)
    candidates = [(d.name, [d]) for d in steps]
    candidates += [(f"avg{k}", steps[-k:]) for k in averages if len(steps) >= k]
    bleu, chrf = BLEU(), CHRF()
    result: dict = {"sentences": len(sources), "checkpoints": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dirs in candidates:
            directory = dirs[0] if len(dirs) == 1 else average_checkpoints(dirs, Path(tmp) / name)
            loaded = load_for_inference(directory, device=device)
            translator = Translator(loaded.model, loaded.tokenizers, loaded.config.decode, device=device)
            hyps = translator.translate(sources)
            # Per-sentence reference NLL, without label smoothing, as validation_loss computes it.
            ids = loaded.tokenizers.tgt.encode(references)
            src_ids = loaded.tokenizers.src.encode(sources)
            nll, tokens = [], []
            with torch.no_grad():
                for start in range(0, len(ids), 128):
                    s_rows = [r + [EOS_ID] for r in src_ids[start:start + 128]]
                    t_rows = ids[start:start + 128]
                    src = _pad(s_rows, PAD_ID).to(device)
                    tgt_in = _pad([[BOS_ID] + r for r in t_rows], PAD_ID).to(device)
                    tgt_out = _pad([r + [EOS_ID] for r in t_rows], PAD_ID).to(device)
                    logp = torch.log_softmax(loaded.model(src, tgt_in).float(), dim=-1)
                    token_nll = -logp.gather(2, tgt_out.unsqueeze(2)).squeeze(2) * (tgt_out != PAD_ID)
                    nll += token_nll.sum(dim=1).tolist()
                    tokens += (tgt_out != PAD_ID).sum(dim=1).tolist()
            result["checkpoints"][name] = {
                "step": loaded.meta["step"],
                "bleu_stats": bleu._extract_corpus_statistics(hyps, [references]),
                "chrf_stats": chrf._extract_corpus_statistics(hyps, [references]),
                "nll": nll,
                "tokens": tokens,
            }
            print(f"decoded {name}", file=sys.stderr, flush=True)
            out.write_text(json.dumps(result))  # after each, so that a cut-short run still tells


def _pad(rows, pad):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _criteria(subset: int):
    """name -> (function of a checkpoint's arrays and a sentence index array, higher is better)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()

    def corpus(metric, stats, rows):
        return metric._compute_score_from_stats(stats[rows].sum(axis=0).tolist()).score

    return {
        f"BLEU, first {subset}": (lambda c, rows: corpus(bleu, c["bleu"], rows[rows < subset]), True),
        "BLEU, all": (lambda c, rows: corpus(bleu, c["bleu"], rows), True),
        "chrF, all": (lambda c, rows: corpus(chrf, c["chrf"], rows), True),
        "loss, all": (lambda c, rows: float(c["nll"][rows].sum() / c["tokens"][rows].sum()), False),
    }


def analyse(path: Path, subset: int, samples: int, seed: int) -> dict:
    data = json.loads(path.read_text())
    n = data["sentences"]
    ckpts = {name: {"step": c["step"], "bleu": np.array(c["bleu_stats"]), "chrf": np.array(c["chrf_stats"]),
                    "nll": np.array(c["nll"]), "tokens": np.array(c["tokens"])}
             for name, c in data["checkpoints"].items()}
    steps = [name for name in ckpts if name.startswith("step_")]
    rng = np.random.default_rng(seed)
    # Resampling the first `subset` sentences within themselves keeps the subset criterion's
    # sample size at `subset` (what training saw), and the rest within the rest.
    resamples = [np.concatenate([rng.integers(0, subset, subset), rng.integers(subset, n, n - subset)])
                 for _ in range(samples)]
    full = np.arange(n)
    report: dict = {"sentences": n, "samples": samples, "checkpoints": {}, "criteria": {}}
    for name, c in ckpts.items():
        report["checkpoints"][name] = {"step": c["step"], **{
            crit: round(f(c, full), 3) for crit, (f, _) in _criteria(subset).items()}}
    for crit, (f, higher) in _criteria(subset).items():
        sign = 1 if higher else -1
        point = np.array([f(ckpts[s], full) for s in steps])
        boot = np.array([[f(ckpts[s], rows) for s in steps] for rows in resamples])  # (samples, ckpts)
        # Noise of a difference between two successive checkpoints (paired: same sentences).
        diff_se = boot[:, 1:].__sub__(boot[:, :-1]).std(axis=0)
        gaps = np.abs(np.diff(point))
        chosen = int(np.argmax(sign * point))
        stability = float(np.mean(np.argmax(sign * boot, axis=1) == chosen))
        late = len(steps) // 2  # the second half of the run: the plateau where selection matters
        report["criteria"][crit] = {
            "se": round(float(boot.std(axis=0).mean()), 3),
            "median_gap_over_se": round(float(np.median(gaps / diff_se)), 2),
            "late_median_gap_over_se": round(float(np.median(gaps[late:] / diff_se[late:])), 2),
            "chosen": steps[chosen],
            "stability": round(stability, 3),
        }
    report["regret"] = _regret(ckpts, steps, subset, samples // 2, rng)
    return report


def _regret(ckpts: dict, names: list[str], subset: int, samples: int, rng: np.random.Generator) -> dict:
    """The bootstrap of the selection itself, with the whole validation set standing for the
    population: each criterion chooses on a resample of the sentences (``subset`` of them for
    the subset criterion, all ``n`` for the others), and the choice is scored by its BLEU and
    chrF on the whole set. Reports the mean regret (the whole-set score of the best checkpoint
    minus the choice's) and how often it exceeds 0.5. (Halves of a finite set would not do:
    a checkpoint lucky on one half is unlucky on the other, which penalises the criteria that
    use the most sentences.)"""
    n = len(next(iter(ckpts.values()))["nll"])
    crits = _criteria(subset)
    bleu, chrf = crits["BLEU, all"][0], crits["chrF, all"][0]
    full = np.arange(n)
    truth = {"bleu": np.array([bleu(ckpts[s], full) for s in names]),
             "chrf": np.array([chrf(ckpts[s], full) for s in names])}
    regrets: dict[str, dict[str, list[float]]] = {crit: {"bleu": [], "chrf": []} for crit in crits}
    for _ in range(samples):
        small, large = rng.integers(0, n, subset), rng.integers(0, n, n)
        for crit, (f, higher) in crits.items():
            rows = small if crit.startswith("BLEU, first") else large
            # The subset criterion's function keeps rows < subset: give it positions 0..subset-1.
            values = ([bleu(ckpts[s], rows) for s in names] if rows is small else [f(ckpts[s], rows) for s in names])
            pick = int(np.argmax(values) if higher else np.argmin(values))
            for metric, scores in truth.items():
                regrets[crit][metric].append(float(scores.max() - scores[pick]))
    return {crit: {f"{metric}_regret": round(float(np.mean(values)), 3) for metric, values in r.items()}
            | {"p_bleu_regret_over_0.5": round(float(np.mean(np.array(r["bleu"]) > 0.5)), 3)}
            for crit, r in regrets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode")
    d.add_argument("run_dir", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--average", type=int, nargs="*", default=[])
    d.add_argument("--device", default="cpu")
    a = sub.add_parser("analyse")
    a.add_argument("stats", type=Path)
    a.add_argument("--subset", type=int, default=300)
    a.add_argument("--samples", type=int, default=1000)
    a.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.command == "decode":
        decode(args.run_dir, args.out, args.average, args.device)
    else:
        print(json.dumps(analyse(args.stats, args.subset, args.samples, args.seed), indent=2))


if __name__ == "__main__":
    main()
