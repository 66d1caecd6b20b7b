"""mtkit against Hugging Face's MarianMTModel at the same wall-clock training budget.

Both train a model of the same size on the same prepared data (mtkit's Arrow splits, same
SentencePiece vocabulary, same token-based batch size) on this machine, one after the other,
for the same number of minutes; both then translate test_2016_flickr with beam 5 and are
scored with sacreBLEU against the same references.

    python scripts/experiments/compare_peer.py --json                  # mtkit's recipe as it is; the peer
                                                                       # trains as long as mtkit's training took
    python scripts/experiments/compare_peer.py --minutes 20 --json     # both train 20 minutes
    python scripts/experiments/compare_peer.py --reuse-mtkit runs/multi30k_en_de --json   # after `make run`

mtkit runs through its own CLI (`mtkit pipeline`), with everything its recipe turns on. Without
`--minutes` it trains its recipe's own budget (4,000 updates for the main recipe) and the peer
gets the wall-clock seconds that took (`train_seconds` in the report, validations included);
with `--minutes M` mtkit trains by the clock (`train.max_minutes=M`, no step limit, the
cool-down by the clock) and so does the peer. The peer is
trained here with a plain loop: AdamW (0.9, 0.98), inverse-square-root warm-up (Marian's own
schedule), label-smoothed cross-entropy, mtkit's own batches (`mtkit.batching.epoch_batches`:
same `max_tokens`, same seed), fp32, 2 threads; its architecture is mtkit's
(`mtkit.export.marian_model`), its warm-up the recipe's and its peak learning rate 2e-3, the
one measured for it (10 minutes: 30.00 BLEU at 2e-3 with warm-up 300, 26.53 at 1e-3 with 500;
mtkit's constant 1.5e-3 is tuned for mtkit's schedule, not Marian's), unless `--peer-lr` /
`--peer-warmup` say otherwise.
`--reuse-mtkit` keeps a finished mtkit run (the one in `--out`, or the run directory it names)
and trains only the peer, on that run's tokenizer and prepared data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# benchlib lives beside the benchmarks; this script runs as python scripts/experiments/NAME.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import MTKIT, ROOT, marian_loss, marian_peer, print_result, source_tensor

PEER_LR = 2e-3  # the peer's peak learning rate under Marian's inverse square root (module docstring)


def run_mtkit(config: str, minutes: float | None, run_dir: Path) -> dict:
    cmd = [*MTKIT, "pipeline", "-c", config, "--set", f"experiment.dir={run_dir}"]
    if minutes is not None:
        cmd += ["--set", f"train.max_minutes={minutes}", "--set", "train.max_steps=100000"]
    print("compare: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text())


def train_peer(run_dir: Path, config, minutes: float, threads: int, lr: float, warmup: int):
    """Train the Marian peer on the run's prepared training split, in mtkit's own batches
    (``mtkit.batching.epoch_batches``: the same ``max_tokens`` and seed), until the deadline."""
    import torch

    from mtkit.batching import TokenizedCorpus, epoch_batches
    from mtkit.data import load_split
    from mtkit.tokenizer import Tokenizers

    torch.set_num_threads(threads)
    torch.manual_seed(config.experiment.seed)
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    corpus = TokenizedCorpus.from_dataset(load_split(run_dir, "train"))
    model = marian_peer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size, tokenizers.joint)
    t = config.train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    warmup = max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1)))
    )
    deadline = time.time() + minutes * 60
    step, tokens = 0, 0
    seed = config.experiment.seed
    batches = (ids for epoch in itertools.count(1) for ids in epoch_batches(corpus, t.max_tokens, seed, epoch))
    for ids in batches:
        if time.time() >= deadline:
            break
        batch = corpus.batch(ids)
        loss = marian_loss(model, batch, t.label_smoothing) / batch.target_tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        sched.step()
        step += 1
        tokens += batch.target_tokens
        if step % 200 == 0:
            print(f"peer: step {step} loss {loss.item():.3f}", file=sys.stderr)
    return model, tokenizers, {"steps": step, "tgt_tokens": tokens}


def translate_peer(model, tokenizers, run_dir: Path, config, batch_size: int = 32) -> list[str]:
    import torch

    from mtkit.data import load_split
    from mtkit.vocab import PAD_ID

    sources = load_split(run_dir, "test")["src_ids"]
    d = config.decode
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            src = source_tensor([sources[i] for i in idx])
            longest = max(len(sources[i]) for i in idx)
            gen = model.generate(
                input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=d.beam,
                max_new_tokens=int(d.max_len_a * longest + d.max_len_b), length_penalty=d.lenpen,
            )
            texts = tokenizers.tgt.decode([row.tolist() for row in gen])
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--minutes", type=float, help="training minutes for each system (default: "
                        "mtkit's recipe as it is, and the peer as long as mtkit's training took)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/compare_peer", help="working directory")
    parser.add_argument("--peer-lr", type=float, help=f"the peer's peak learning rate (default: {PEER_LR})")
    parser.add_argument("--peer-warmup", type=int, help="the peer's warm-up updates (default: the recipe's)")
    parser.add_argument("--reuse-mtkit", nargs="?", const="", metavar="RUN",
                        help="keep a finished mtkit run: the one in --out, or RUN (e.g. runs/multi30k_en_de)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import sacrebleu

    from mtkit.config import load_config

    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = (ROOT / args.reuse_mtkit).resolve() if args.reuse_mtkit else out / "mtkit"
    report_file = run_dir / "report.json"
    reuse = args.reuse_mtkit is not None and report_file.exists()
    if args.reuse_mtkit and not reuse:  # a named run must be a finished one
        sys.exit(f"compare_peer: {run_dir} has no report.json: not a finished mtkit pipeline run")
    report = json.loads(report_file.read_text()) if reuse else run_mtkit(args.config, args.minutes, run_dir)
    config = load_config(run_dir / "config.yaml", [f"experiment.dir={run_dir}"])  # the config it ran
    if args.minutes is None and not report.get("train_seconds"):
        sys.exit(f"compare_peer: {run_dir}'s report does not say how long training took: give --minutes")
    minutes = args.minutes if args.minutes is not None else report["train_seconds"] / 60
    peer_lr = args.peer_lr if args.peer_lr is not None else PEER_LR
    peer_warmup = args.peer_warmup if args.peer_warmup is not None else config.train.warmup_steps
    model, tokenizers, stats = train_peer(run_dir, config, minutes, args.threads, peer_lr, peer_warmup)
    hyps = translate_peer(model, tokenizers, run_dir, config)
    refs = (run_dir / "translations" / f"test.ref.{config.data.tgt_lang}").read_text().splitlines()
    peer = sacrebleu.BLEU().corpus_score(hyps, [refs])
    (out / "peer.hyp").write_text("".join(h + "\n" for h in hyps))
    result = {
        "minutes": round(minutes, 2),
        "mtkit_train_minutes": round((report.get("train_seconds") or 0) / 60, 2),
        "bleu": report["test"]["bleu"],
        "peer_bleu": round(peer.score, 2),
        "delta": round(report["test"]["bleu"] - peer.score, 2),
        "signature": report["test"]["signature"],
        "mtkit_updates": report["model"].get("updates", report["model"]["step"]),
        "mtkit_chosen_step": report["model"]["step"],
        "peer_steps": stats["steps"],
        "peer_tgt_tokens": stats["tgt_tokens"],
        "peer_lr": peer_lr,
        "peer_warmup": peer_warmup,
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
