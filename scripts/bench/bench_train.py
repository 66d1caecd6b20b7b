"""Training throughput of mtkit against Hugging Face's MarianMTModel, in one run, on CPU.

Both models get the same architecture (Marian is post-norm, so mtkit runs with
``model.norm=post``), the same vocabulary, the same token-based length-bucketed batches, AdamW,
label-smoothed cross-entropy normalised by target tokens, dropout 0.1, fp32 and the same
number of threads. Timing alternates blocks of steps between the two, so load from other
processes on the machine hits both alike. MFU is the model's useful FLOP/s (non-padding tokens,
forward + backward = 3x forward) over the fp32 matmul peak measured with a large ``torch.mm``
in the same run. mtkit runs with the allocator policy its commands set (``mtkit.malloc``: freed
memory stays in the process), the peer with glibc's defaults, as each ships;
``--peer-same-allocator`` also times the peer under mtkit's policy. mtkit's update is
``mtkit.train.train_step`` itself; the peer is ``mtkit.export.marian_model`` (via ``benchlib``).

    python scripts/bench/bench_train.py                       # synthetic Multi30k-like lengths
    python scripts/bench/bench_train.py --run runs/multi30k   # the batches of a prepared experiment
    python scripts/bench/bench_train.py --json                # one JSON object on stdout
    python scripts/bench/bench_train.py --presets --no-peer   # mtkit's default and its family presets

``--presets`` also times, with ``train_step`` in float32 on the same batches, mtkit's default
(pre-norm) model of ``--size`` and the family presets of that size (``t5_small``: RMSNorm,
relative bias, GeGLU, no biases; ``llama_small``: a decoder-only model with RMSNorm, rotary
positions, SwiGLU, no biases, grouped-query attention), parameter-matched; keys
``t5_small_tok_s_vs_small`` and ``llama_small_tok_s_vs_small`` are their target tokens per
second over the default's: the cost of the blocks (and, for llama, of the decoder-only layout).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchlib import Clocks, marian_loss, marian_peer, print_result
from torch import nn

from mtkit.batching import Batch, TokenizedCorpus, epoch_batches
from mtkit.config import ModelConfig, TrainConfig
from mtkit.loss import TranslationLoss
from mtkit.malloc import keep_freed_memory
from mtkit.models import build_model
from mtkit.runtime import Runtime
from mtkit.train import make_optimizer, train_step
from mtkit.vocab import PAD_ID

PRESETS = {"small": ["t5_small", "llama_small"], "base": ["t5_base", "llama_base"]}
"""``--presets``: the family presets parameter-matched to each ``--size``."""
TODAY = {"small": dict(norm_type="rms", positions="rope", activation="swiglu", ffn_dim=680, bias=False)}
"""``--presets``: the ``--size`` encoder-decoder with Llama's blocks, as parameter-matched in
``scripts/experiments/compare_architectures.py`` (arm ``encdec_today``): key ``{size}_today_tok_s_vs_{size}``."""

Step = Callable[[Batch], float]
"""One training update on a batch; returns its loss per target token."""


def synthetic_corpus(pairs: int, vocab: int, seed: int) -> TokenizedCorpus:
    """Lengths like Multi30k En-De with an 8k SentencePiece vocabulary (about 15 source and
    17 target pieces on average, correlated)."""
    rng = np.random.default_rng(seed)
    src_len = np.clip(rng.gamma(6.0, 2.5, pairs).astype(int), 2, 60)
    tgt_len = np.clip((src_len * rng.normal(1.12, 0.15, pairs)).astype(int), 2, 70)
    src = [rng.integers(4, vocab, n).tolist() for n in src_len]
    tgt = [rng.integers(4, vocab, n).tolist() for n in tgt_len]
    return TokenizedCorpus.from_lists(src, tgt)


def prepared_corpus(run: Path) -> tuple[TokenizedCorpus, int]:
    from mtkit.data import load_split
    from mtkit.tokenizer import Tokenizers

    tokenizers = Tokenizers.load(run / "tokenizer")
    return TokenizedCorpus.from_dataset(load_split(run, "train")), tokenizers.tgt.vocab_size


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops(cfg: ModelConfig, vocab: int, batches: list[Batch]) -> float:
    """Training FLOPs (3x forward) of the non-padding tokens of ``batches``: matmuls of every
    projection, attention scores and weighted sums, and the output projection."""
    d, f = cfg.d_model, cfg.ffn_dim
    total = 0.0
    for batch in batches:
        s = (batch.src != PAD_ID).sum(1).double()
        t = (batch.tgt_out != PAD_ID).sum(1).double()
        enc = cfg.encoder_layers * (s.sum() * 2 * (4 * d * d + 2 * d * f) + 4 * d * (s * s).sum())
        dec = cfg.decoder_layers * (
            t.sum() * 2 * (4 * d * d + 2 * d * d + 2 * d * f)  # self qkv+out, cross q+out, ffn
            + s.sum() * 2 * 2 * d * d  # cross-attention keys/values of the source
            + 4 * d * (t * t).sum() + 4 * d * (t * s).sum()
        )
        total += float(enc + dec + t.sum() * 2 * d * vocab)
    return 3 * total


def mtkit_step(cfg: ModelConfig, vocab: int, train_cfg: TrainConfig, bf16: bool = False,
               compile: bool = False) -> tuple[nn.Module, Step]:
    """mtkit's training update, ``mtkit.train.train_step`` itself, on one batch; ``bf16``: CPU
    autocast (``train.precision=bf16``); ``compile``: torch.compile as with ``train.compile=true``."""
    model = build_model(cfg, vocab, vocab).train()
    loss_fn: nn.Module = TranslationLoss(model, train_cfg.label_smoothing)
    if compile:
        loss_fn = torch.compile(loss_fn, dynamic=True)  # type: ignore[assignment]
    device = torch.device("cpu")
    optimizer = make_optimizer(model, train_cfg, device)
    runtime = Runtime(device=device, precision="bf16" if bf16 else "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # only fp16 scales, and fp16 needs CUDA

    def step(batch: Batch) -> float:
        tokens = batch.target_tokens
        loss, _, _ = train_step(loss_fn, model, optimizer, scaler, [batch], tokens, train_cfg.lr, train_cfg, runtime)
        return loss / tokens

    return model, step


def marian_step(cfg: ModelConfig, vocab: int, train_cfg: TrainConfig) -> tuple[nn.Module, Step]:
    """The same network as Hugging Face's MarianMTModel (``benchlib.marian_peer``), trained
    the way its users do (``benchlib.marian_loss``)."""
    model = marian_peer(cfg, vocab, vocab)
    # Fused AdamW, as transformers' Trainer uses by default ("adamw_torch_fused").
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  fused=True)

    def step(batch: Batch) -> float:
        loss = marian_loss(model, batch, train_cfg.label_smoothing)
        (loss / batch.target_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) / batch.target_tokens

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--run", type=Path, help="a prepared experiment directory (default: synthetic data)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the synthetic data")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per model")
    parser.add_argument("--block", type=int, default=6, help="steps per timing block (models alternate)")
    parser.add_argument("--no-peer", action="store_true", help="time mtkit only")
    parser.add_argument("--compile", action="store_true",
                        help="also time mtkit with train.compile=true (compilation happens in the warm-up)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time mtkit with bf16 autocast (train.precision=bf16), outside the comparison")
    parser.add_argument("--peer-same-allocator", action="store_true",
                        help="also time the peer with mtkit's allocator policy (mtkit.malloc)")
    parser.add_argument("--presets", action="store_true",
                        help="also time mtkit's default (pre-norm) model of --size, the family presets of that "
                             "size (t5_*, llama_*) and it with Llama's blocks ({size}_today), keys "
                             "{preset}_tok_s_vs_{size}; with --bf16 in bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    if args.run is not None:
        corpus, vocab = prepared_corpus(args.run)
    else:
        corpus, vocab = synthetic_corpus(20_000, args.vocab, seed=1), args.vocab
    batches = [corpus.batch(ids) for ids in epoch_batches(corpus, args.max_tokens, seed=1, epoch=1)]
    batches = batches[: args.warmup + args.steps]
    model_cfg = ModelConfig(size=args.size, norm="post", dropout=0.1)
    train_cfg = TrainConfig(lr=1e-4)

    runners: dict[str, tuple[nn.Module, Step]] = {"mtkit": mtkit_step(model_cfg, vocab, train_cfg)}
    if not args.no_peer:
        runners["marian"] = marian_step(model_cfg, vocab, train_cfg)
    if args.peer_same_allocator and not args.no_peer:
        runners["marian_heap"] = marian_step(model_cfg, vocab, train_cfg)
    if args.compile:
        runners["mtkit_compiled"] = mtkit_step(model_cfg, vocab, train_cfg, compile=True)
    if args.bf16:
        runners["mtkit_bf16"] = mtkit_step(model_cfg, vocab, train_cfg, bf16=True)
    presets = PRESETS.get(args.size, []) if args.presets else []
    if args.presets:  # mtkit's own default model of the size and the families at that size (--bf16: in bf16)
        configs = {name: ModelConfig(size=name, dropout=0.1) for name in [args.size, *presets]}
        if args.size in TODAY:
            presets = [*presets, f"{args.size}_today"]
            configs[f"{args.size}_today"] = ModelConfig(size=args.size, dropout=0.1, **TODAY[args.size])
        for name, cfg in configs.items():
            runners[f"preset_{name}"] = mtkit_step(cfg, vocab, train_cfg, bf16=args.bf16)
    # Each runs with its allocator policy: mtkit's commands keep freed memory (mtkit.malloc),
    # the peer runs with glibc's defaults as its users get it (and, on request, like mtkit).
    heap = {name: name != "marian" for name in runners}
    keep_freed_memory(False)
    peak_before = matmul_peak(args.threads)
    params = {name: sum(p.numel() for p in model.parameters()) for name, (model, _) in runners.items()}
    clocks = Clocks()
    losses: dict[str, list[float]] = {name: [] for name in runners}
    for name, (_, step) in runners.items():
        keep_freed_memory(heap[name])
        for batch in batches[: args.warmup]:
            step(batch)
    timed = batches[args.warmup :]
    for start in range(0, len(timed), args.block):
        for name, (_, step) in runners.items():
            keep_freed_memory(heap[name])
            with clocks(name):
                for batch in timed[start : start + args.block]:
                    losses[name].append(step(batch))
    seconds, cpu_seconds = clocks.wall, clocks.cpu
    # The machine's peak is the best of two measurements (other load only lowers it).
    peak = max(peak_before, matmul_peak(args.threads))

    tgt_tokens = sum(b.target_tokens for b in timed)
    all_tokens = sum(b.real_tokens for b in timed)
    flops = model_flops(model_cfg, vocab, timed)
    result = {
        "size": args.size,
        "data": str(args.run) if args.run else "synthetic",
        "vocab": vocab,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "timed_steps": len(timed),
        "sentences_per_batch": float(np.mean([b.src.shape[0] for b in timed])),
        "params": params,
        "tgt_tok_per_s": tgt_tokens / seconds["mtkit"],
        "tok_per_s": all_tokens / seconds["mtkit"],
        "mfu": flops / seconds["mtkit"] / peak,
        "model_gflop_per_s": flops / seconds["mtkit"] / 1e9,
        "peak_gflop_per_s": peak / 1e9,
        "first_loss": losses["mtkit"][0],
    }
    if "marian" in runners:
        result.update({
            "peer": "transformers MarianMTModel (sdpa)",
            "peer_tgt_tok_per_s": tgt_tokens / seconds["marian"],
            "peer_tok_per_s": all_tokens / seconds["marian"],
            "peer_mfu": flops / seconds["marian"] / peak,
            "speedup_vs_hf": seconds["marian"] / seconds["mtkit"],
            "speedup_vs_hf_cpu_time": cpu_seconds["marian"] / cpu_seconds["mtkit"],
        })
    if "marian_heap" in runners:
        result["peer_same_allocator_tgt_tok_per_s"] = tgt_tokens / seconds["marian_heap"]
        result["speedup_vs_hf_same_allocator"] = seconds["marian_heap"] / seconds["mtkit"]
    if args.compile:
        result["compiled_tgt_tok_per_s"] = tgt_tokens / seconds["mtkit_compiled"]
        result["compiled_mfu"] = flops / seconds["mtkit_compiled"] / peak
        if "marian" in runners:
            result["compiled_speedup_vs_hf"] = seconds["marian"] / seconds["mtkit_compiled"]
    if args.bf16:
        result["bf16_tgt_tok_per_s"] = tgt_tokens / seconds["mtkit_bf16"]
        result["bf16_speedup_vs_fp32"] = seconds["mtkit"] / seconds["mtkit_bf16"]
        if "marian" in runners:  # what `mtkit train` runs with precision=auto on a CPU with native bf16
            result["bf16_speedup_vs_hf"] = seconds["marian"] / seconds["mtkit_bf16"]
    if args.presets:
        reference = seconds[f"preset_{args.size}"]
        result["presets_tgt_tok_per_s"] = {name: tgt_tokens / seconds[f"preset_{name}"]
                                           for name in [args.size, *presets]}
        for name in presets:
            result[f"{name}_tok_s_vs_{args.size}"] = reference / seconds[f"preset_{name}"]
    if args.json:
        print_result(result, as_json=True)
        return
    print(f"{args.size} model, {len(timed)} timed steps of ~{result['sentences_per_batch']:.0f} sentences, "
          f"{args.threads} threads, peak fp32 matmul {result['peak_gflop_per_s']:.0f} GFLOP/s")
    print(f"mtkit : {result['tgt_tok_per_s']:8,.0f} tgt tok/s  {result['tok_per_s']:8,.0f} src+tgt tok/s  "
          f"MFU {result['mfu']:.1%}  ({params['mtkit'] / 1e6:.2f}M parameters)")
    if "marian" in runners:
        print(f"Marian: {result['peer_tgt_tok_per_s']:8,.0f} tgt tok/s  "
              f"{result['peer_tok_per_s']:8,.0f} src+tgt tok/s  "
              f"MFU {result['peer_mfu']:.1%}  ({params['marian'] / 1e6:.2f}M parameters)")
        print(f"speed-up of mtkit over Marian: {result['speedup_vs_hf']:.2f}x wall clock, "
              f"{result['speedup_vs_hf_cpu_time']:.2f}x in CPU time")
    if "marian_heap" in runners:
        print(f"Marian with mtkit's allocator policy: {result['peer_same_allocator_tgt_tok_per_s']:8,.0f} tgt tok/s; "
              f"mtkit {result['speedup_vs_hf_same_allocator']:.2f}x")
    if args.compile:
        print(f"mtkit compiled: {result['compiled_tgt_tok_per_s']:,.0f} tgt tok/s, MFU {result['compiled_mfu']:.1%}"
              + (f", {result['compiled_speedup_vs_hf']:.2f}x Marian" if "marian" in runners else ""))
    if args.bf16:
        print(f"mtkit bf16 autocast: {result['bf16_tgt_tok_per_s']:,.0f} tgt tok/s "
              f"({result['bf16_speedup_vs_fp32']:.2f}x its fp32"
              + (f", {result['bf16_speedup_vs_hf']:.2f}x Marian fp32)" if "marian" in runners else ")"))
    if args.presets:
        for name, tok_per_s in result["presets_tgt_tok_per_s"].items():
            ratio = f" ({result[f'{name}_tok_s_vs_{args.size}']:.2f}x {args.size})" if name != args.size else ""
            print(f"preset {name}: {tok_per_s:8,.0f} tgt tok/s{ratio}")


if __name__ == "__main__":
    main()
