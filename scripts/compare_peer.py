"""mtkit against Hugging Face's MarianMTModel at the same wall-clock training budget.

Both train a model of the same size on the same prepared data (mtkit's Arrow splits, same
SentencePiece vocabulary, same token-based batch size) on this machine, one after the other,
for the same number of minutes; both then translate test_2016_flickr with beam 5 and are
scored with sacreBLEU against the same references.

    python scripts/compare_peer.py --minutes 20 --json

mtkit runs through its own CLI (`mtkit pipeline` with `train.max_minutes` set), with
everything its recipe turns on (for example the time-based learning-rate cool-down). The peer is
trained here with a plain loop: AdamW (0.9, 0.98), inverse-square-root warm-up (Marian's own
schedule), label-smoothed cross-entropy, the same `max_tokens` batches, fp32, 2 threads; its peak
learning rate and warm-up are the recipe's unless `--peer-lr` / `--peer-warmup` say otherwise.
`--reuse-mtkit` keeps an existing mtkit run in `--out` and trains only the peer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mtkit(config: str, minutes: float, run_dir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "mtkit", "pipeline", "-c", config,
        "--set", f"experiment.dir={run_dir}",
        "--set", f"train.max_minutes={minutes}",
    ]
    print("compare: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text())


def token_batches(lengths: list[int], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length so that batch size x longest <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_next = max(longest, lengths[i])
        if current and longest_next * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_next = [], lengths[i]
        current.append(i)
        longest = longest_next
    if current:
        batches.append(current)
    return batches


def train_peer(run_dir: Path, config, minutes: float, threads: int, lr: float, warmup: int):
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from transformers import MarianConfig, MarianMTModel

    from mtkit.tokenizer import Tokenizers
    from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

    torch.set_num_threads(threads)
    torch.manual_seed(config.experiment.seed)
    tokenizers = Tokenizers.load(run_dir / "tokenizer")
    train = load_from_disk(str(run_dir / "data" / "train"))
    src_ids, tgt_ids = train["src_ids"], train["tgt_ids"]
    m = config.model
    peer_config = MarianConfig(
        vocab_size=tokenizers.tgt.vocab_size, d_model=m.d_model,
        encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.heads, decoder_attention_heads=m.heads,
        encoder_ffn_dim=m.ffn_dim, decoder_ffn_dim=m.ffn_dim,
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
        activation_function=m.activation, max_position_embeddings=m.max_positions,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )
    model = MarianMTModel(peer_config)
    t = config.train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    warmup = max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1)))
    )
    lengths = [max(len(a), len(b)) + 2 for a, b in zip(src_ids, tgt_ids, strict=True)]
    rng = random.Random(config.experiment.seed)
    deadline = time.time() + minutes * 60
    step, tokens = 0, 0
    model.train()
    while time.time() < deadline:
        batches = token_batches(lengths, t.max_tokens, rng)
        rng.shuffle(batches)
        for batch in batches:
            if time.time() >= deadline:
                break
            src = [src_ids[i] + [EOS_ID] for i in batch]
            tgt = [tgt_ids[i] for i in batch]
            src_t = _pad(src, PAD_ID)
            dec_in = _pad([[BOS_ID] + s for s in tgt], PAD_ID)
            labels = _pad([s + [EOS_ID] for s in tgt], -100)
            logits = model(input_ids=src_t, attention_mask=src_t.ne(PAD_ID), decoder_input_ids=dec_in).logits
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]), labels.view(-1),
                ignore_index=-100, label_smoothing=t.label_smoothing,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            opt.step()
            sched.step()
            step += 1
            tokens += int(labels.ne(-100).sum())
            if step % 200 == 0:
                print(f"peer: step {step} loss {loss.item():.3f}", file=sys.stderr)
    return model, tokenizers, {"steps": step, "tgt_tokens": tokens}


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def translate_peer(model, tokenizers, run_dir: Path, config, batch_size: int = 32) -> list[str]:
    import torch
    from datasets import load_from_disk

    from mtkit.vocab import EOS_ID, PAD_ID

    test = load_from_disk(str(run_dir / "data" / "test"))
    d = config.decode
    model.eval()
    order = sorted(range(len(test)), key=lambda i: test[i]["src_len"])
    out: list[str] = [""] * len(test)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            src = _pad([test[i]["src_ids"] + [EOS_ID] for i in idx], PAD_ID)
            longest = max(test[i]["src_len"] for i in idx)
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
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget for each system")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/compare_peer", help="working directory")
    parser.add_argument("--peer-lr", type=float, help="the peer's peak learning rate (default: the recipe's)")
    parser.add_argument("--peer-warmup", type=int, help="the peer's warm-up updates (default: the recipe's)")
    parser.add_argument("--reuse-mtkit", action="store_true", help="keep the mtkit run already in --out")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import sacrebleu

    from mtkit.config import load_config

    out = (ROOT / args.out).resolve()
    run_dir = out / "mtkit"
    config = load_config(ROOT / args.config, [f"experiment.dir={run_dir}"])
    if args.reuse_mtkit and (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
    else:
        report = run_mtkit(args.config, args.minutes, run_dir)
    peer_lr = args.peer_lr if args.peer_lr is not None else config.train.lr
    peer_warmup = args.peer_warmup if args.peer_warmup is not None else config.train.warmup_steps
    model, tokenizers, stats = train_peer(run_dir, config, args.minutes, args.threads, peer_lr, peer_warmup)
    hyps = translate_peer(model, tokenizers, run_dir, config)
    refs = (run_dir / "translations" / f"test.ref.{config.data.tgt_lang}").read_text().splitlines()
    peer = sacrebleu.BLEU().corpus_score(hyps, [refs])
    (out / "peer.hyp").write_text("".join(h + "\n" for h in hyps))
    result = {
        "minutes": args.minutes,
        "bleu": report["test"]["bleu"],
        "peer_bleu": round(peer.score, 2),
        "delta": round(report["test"]["bleu"] - peer.score, 2),
        "signature": report["test"]["signature"],
        "mtkit_steps": report["model"]["step"],
        "peer_steps": stats["steps"],
        "peer_tgt_tokens": stats["tgt_tokens"],
        "peer_lr": peer_lr,
        "peer_warmup": peer_warmup,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:12} {value}")


if __name__ == "__main__":
    main()
