"""Fine-tuning and decoding speed of an imported Hugging Face Marian model: mtkit against
transformers, on the same weights and the same data, measured in one run on CPU.

    python scripts/bench/bench_finetune.py            # an opus-mt-like model of mtkit's small size
    python scripts/bench/bench_finetune.py --json     # one JSON object on stdout
    python scripts/bench/bench_finetune.py --model DIR  # a Marian save_pretrained directory instead

The model. Without ``--model``, a SentencePiece model (unigram, ``--vocab`` pieces) is trained
on Multi30k En-De and written as an opus-mt directory would hold it (``source.spm`` and
``target.spm``, one ``vocab.json``, ``<pad>`` last and the decoder start, swish, scaled and tied
embeddings, the generation settings of opus-mt: beam 4), with a ``MarianMTModel`` of mtkit's
``small`` shape (d_model 256, 3+3 layers, 4 heads, ffn 1024), random, then trained by a plain
transformers loop for ``--pretrain`` updates of 64 pairs (about 150 s), so that it writes
sentences that end, as a released model does. ``mtkit import huggingface``
(the CLI) makes it an mtkit run. Before timing, the two are checked to be one model: their
NLL on a batch (eval mode, float32) and their token counts per batch must agree.

Fine-tuning. The same updates (the same Multi30k sentences each, in mtkit's token-bucketed
batches of ``--max-tokens``), AdamW at the same learning rate, label smoothing 0.1, gradient
clipping at 1.0, dropout as imported, starting from the same weights:

- ``mtkit``: ``mtkit.train.train_step`` itself on a model loaded as ``mtkit train --init-from
  RUN`` loads it (``init_weights_from``), at the precision ``train.precision: auto`` picks
  (``setup_runtime``: bfloat16 autocast on a CPU with native bfloat16, else float32), with the
  allocator policy of mtkit's commands (``mtkit.malloc``); ``mtkit_fp32`` the same at float32;
- ``hf``: a plain transformers loop: batches as ``DataCollatorForSeq2Seq`` makes them (labels
  padded with -100, ``decoder_input_ids`` from ``prepare_decoder_input_ids_from_labels``), the
  logits, ``CrossEntropyLoss(label_smoothing=0.1)`` (what ``Seq2SeqTrainer``'s label smoother
  computes), backward, ``clip_grad_norm_``, fused AdamW (the Trainer's default), float32.

Both train on pre-tokenized batches (mtkit's prepare stage and ``datasets.map`` do that once).
Timing alternates blocks of ``--block`` updates between the systems, after ``--warmup`` untimed
updates each, so that other load on the machine hits them alike. ``speedup_vs_hf`` is mtkit's
target tokens per second over transformers'.

Decoding. ``--sentences`` Multi30k test sentences (``test_2016_flickr``), text in, text out,
in batches of ``--hf-batch`` sentences of one source length (``equal_length_batches``:
``generate`` has one length limit per batch, mtkit one per sentence):

- ``mtkit``: ``open_translator(RUN, threads=N, workers=N)`` with the run's decode settings, as
  ``mtkit translate --threads N`` opens it (``decode.backend: auto``, or ``--backend``;
  ``mtkit_backend`` is the line it says), ``Translator.translate``;
- ``hf``: the tokenizer, ``model.generate`` with the model's generation settings (beam 4, as
  opus-mt's) on each batch, ``batch_decode``; ``max_new_tokens`` is mtkit's length limit
  (``decode.max_len_a``/``max_len_b``), which ``generate`` would otherwise take as 512.

The two take turns on chunks of ``--chunk`` sentences after one warm-up chunk each;
``decode_speedup_vs_hf_generate`` is mtkit's sentences per second over transformers'. Both
run on ``--threads`` threads (mtkit as CTranslate2 threads or PyTorch worker processes, each
translating its own batches; transformers as torch's threads); ``identical_outputs`` is the
share of equal translations, ``mean_output_words`` shows that both wrote as much.

How much the figures move: a lot, with the machine's other load, as the systems use their
threads differently: torch's threads within an operation (transformers, mtkit's fine-tuning)
lose most when another process holds a core, mtkit's decoding (one thread per batch) least;
and ``generate``'s speed alone moves by a third between runs of an idle machine. Compare runs
at a similar ``load_average_1m``, and check with ``--threads 1``. On the idle 2-core machine
(load 1.4-2.0, 2 threads), 2026-12-06, the default run (4 min 45 s): ``speedup_vs_hf`` 2.02
(bf16; float32 1.05), ``decode_speedup_vs_hf_generate`` 3.35 (CTranslate2 float32: ``auto``
has no validation set to check int8 against on an imported run); again with ``--work`` and
``--steps 0``: 3.03, 3.26, 3.96; ``--backend torch`` 2.29; ``--compute-type int8`` 7.65 (91%
of the outputs identical to transformers'). With the random model untrained (``--pretrain 0``),
every hypothesis reaches the length limit, and the figure is 1.3 at best.
``--profile`` prints mtkit's top operators of one fine-tuning update to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import MTKIT, MULTI30K, ROOT, Clocks, print_result

from mtkit.batching import Batch, TokenizedCorpus, epoch_batches
from mtkit.checkpoint import init_weights_from, load_for_inference
from mtkit.config import DecodeConfig, TrainConfig
from mtkit.engines import open_translator
from mtkit.fileio import atomic_dir, read_lines
from mtkit.loss import TranslationLoss
from mtkit.malloc import keep_freed_memory
from mtkit.models import build_model
from mtkit.runtime import Runtime, setup_runtime
from mtkit.tokenizer import Tokenizers
from mtkit.train import make_optimizer, train_step

SMALL: dict[str, Any] = dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                             max_position_embeddings=512)
"""mtkit's ``small`` size in ``MarianConfig``'s words (dropout and the rest at Marian's defaults)."""

Step = Callable[[int], float]
"""One training update on the batch of that index; returns its loss per target token."""


# --------------------------------------------------------------------------- the model


def multi30k(split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """English and German sentences of a Multi30k split."""
    names = {"train": "train", "test": "test_2016_flickr"}
    en, de = (list(read_lines(MULTI30K / f"{names[split]}.{lang}.gz"))[:limit] for lang in ("en", "de"))
    return en, de


def make_marian(directory: Path, src: list[str], tgt: list[str], vocab_size: int, updates: int) -> Path:
    """An opus-mt-like ``save_pretrained`` directory of mtkit's small shape, its SentencePiece
    model trained on ``src`` and ``tgt``, its weights random (seed 0) then trained ``updates``
    updates on those pairs (``pretrain``); ``directory`` is new (made empty)."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(src + tgt), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2, num_threads=2)
    for name in ("source.spm", "target.spm"):  # one joint model, as both sides of an opus-mt directory
        (directory / name).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    vocab = ["</s>", "<unk>", *pieces, "<pad>"]
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MarianTokenizer", "source_lang": "en", "target_lang": "de", "model_max_length": 512,
        "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}), encoding="utf-8")
    pad = len(vocab) - 1
    config = MarianConfig(vocab_size=len(vocab), pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
                          forced_eos_token_id=0, activation_function="swish", scale_embedding=True,
                          share_encoder_decoder_embeddings=True, **SMALL)
    torch.manual_seed(0)
    marian = MarianMTModel(config)
    marian.generation_config.update(num_beams=4, max_length=512, bad_words_ids=[[pad]], forced_eos_token_id=0)
    marian.save_pretrained(directory)
    tokenizer = MarianTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if updates:
        pretrain(marian, tokenizer, src, tgt, updates).save_pretrained(directory)
    return directory


def pretrain(model: Any, tokenizer: Any, src: list[str], tgt: list[str], updates: int,
             sentences: int = 64, lr: float = 1e-3) -> Any:
    """``model`` trained ``updates`` updates of ``sentences`` random pairs each, by a plain
    transformers loop (AdamW at ``lr``, label smoothing 0.1, float32): enough for it to write
    sentences that end, as a released model does (a random one writes every hypothesis to the
    length limit, which neither system meets in use)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
    order = np.random.default_rng(0).permutation(len(src))
    started = time.perf_counter()
    for update in range(updates):
        rows = order[update * sentences : (update + 1) * sentences]
        inputs = tokenizer([src[i] for i in rows], text_target=[tgt[i] for i in rows], padding=True,
                           return_tensors="pt")
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        labels = inputs["labels"].masked_fill(inputs["labels"] == tokenizer.pad_token_id, -100)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits
        loss = criterion(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (update + 1) % 50 == 0 or update + 1 == updates:
            say(f"pre-training the random model: update {update + 1}/{updates}, loss {loss.item():.2f} "
                f"({time.perf_counter() - started:.0f} s)")
    return model.eval()


def import_run(model_dir: Path, run: Path) -> Path:
    """``mtkit import huggingface model_dir -o run``, through the CLI."""
    done = subprocess.run([*MTKIT, "import", "huggingface", str(model_dir), "-o", str(run)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mtkit import huggingface failed: {done.stderr.strip()}")
    return run


# --------------------------------------------------------------------------- the data


class Updates:
    """The batches of the benchmark's updates, the same sentences for both systems: mtkit's
    ``Batch`` from its tokenizer, and transformers' tensors from the model's tokenizer."""

    def __init__(self, tokenizers: Tokenizers, hf_tokenizer: Any, hf_model: Any, src: list[str], tgt: list[str],
                 max_tokens: int, count: int):
        corpus = TokenizedCorpus.from_lists(tokenizers.src.encode(src), tokenizers.tgt.encode(tgt))
        chosen = epoch_batches(corpus, max_tokens, seed=1, epoch=1)[:count]
        self.mtkit: list[Batch] = [corpus.batch(indices) for indices in chosen]
        self.hf: list[dict[str, torch.Tensor]] = []
        for indices in chosen:
            inputs = hf_tokenizer([src[i] for i in indices], text_target=[tgt[i] for i in indices], padding=True,
                                  return_tensors="pt")
            labels = inputs["labels"]
            decoder_input_ids = hf_model.prepare_decoder_input_ids_from_labels(labels=labels)
            labels = labels.masked_fill(labels == hf_tokenizer.pad_token_id, -100)
            self.hf.append({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                            "decoder_input_ids": decoder_input_ids, "labels": labels})
        mismatched = [i for i, (ours, theirs) in enumerate(zip(self.mtkit, self.hf, strict=True))
                      if ours.target_tokens != int((theirs["labels"] != -100).sum())]
        if mismatched:
            sys.exit(f"the tokenizers disagree: {len(mismatched)} of {len(chosen)} batches differ in target tokens")

    def target_tokens(self, indices: range) -> int:
        return sum(self.mtkit[i].target_tokens for i in indices)


# --------------------------------------------------------------------------- fine-tuning


def mtkit_trainer(run: Path, updates: Updates, train_cfg: TrainConfig, precision: str) -> tuple[torch.nn.Module, Step]:
    """mtkit's update (``train_step``) on the imported weights, loaded as ``mtkit train
    --init-from run`` loads them, at ``precision``."""
    loaded = load_for_inference(run)
    config = loaded.config.model_copy(update={"train": train_cfg})
    model = build_model(config.model, loaded.tokenizers.src.vocab_size, loaded.tokenizers.tgt.vocab_size,
                        loaded.tokenizers.shared_vocab)
    device = torch.device("cpu")
    init_weights_from(run, model, config, loaded.tokenizers, device)
    model.train()
    loss_fn = TranslationLoss(model, train_cfg.label_smoothing)
    optimizer = make_optimizer(model, train_cfg, device)
    runtime = Runtime(device=device, precision=precision)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # only fp16 scales, and fp16 needs CUDA

    def step(index: int) -> float:
        batch = updates.mtkit[index]
        tokens = batch.target_tokens
        loss, _, _ = train_step(loss_fn, model, optimizer, scaler, [batch], tokens, train_cfg.lr, train_cfg, runtime)
        return loss / tokens

    return loss_fn, step


def hf_trainer(model_dir: Path, updates: Updates, train_cfg: TrainConfig) -> tuple[torch.nn.Module, Step]:
    """A plain transformers fine-tuning loop, float32 (the module docstring says what it does)."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(model_dir).train()
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing, ignore_index=-100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  weight_decay=train_cfg.weight_decay, fused=True)

    def step(index: int) -> float:
        batch = updates.hf[index]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        loss = criterion(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def nll_per_token(run: Path, model_dir: Path, updates: Updates) -> tuple[float, float]:
    """The NLL per target token of the first batch, eval mode, float32: (mtkit, transformers).
    Equal when the import is exact and both see the same data."""
    from transformers import MarianMTModel

    loaded = load_for_inference(run)
    marian = MarianMTModel.from_pretrained(model_dir).eval()
    ours, theirs = updates.mtkit[0], updates.hf[0]
    with torch.no_grad():
        _, nll = TranslationLoss(loaded.model.eval(), 0.0)(ours.src, ours.tgt_in, ours.tgt_out)
        logits = marian(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"],
                        decoder_input_ids=theirs["decoder_input_ids"]).logits
        hf_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), theirs["labels"].flatten())
    return float(nll) / ours.target_tokens, float(hf_nll)


def time_training(trainers: dict[str, Step], warmup: int, steps: int,
                  block: int) -> tuple[Clocks, dict[str, list[float]]]:
    """``warmup`` untimed updates each, then ``steps`` timed ones in alternating blocks."""
    clocks = Clocks()
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    for name, step in trainers.items():
        keep_freed_memory(name != "hf")  # each with its allocator policy, as it ships
        for index in range(warmup):
            step(index)
    for start in range(warmup, warmup + steps, block):
        for name, step in trainers.items():
            keep_freed_memory(name != "hf")
            with clocks(name):
                for index in range(start, min(start + block, warmup + steps)):
                    losses[name].append(step(index))
    keep_freed_memory(False)
    return clocks, losses


def profile_update(step: Step, index: int, rows: int = 20) -> str:
    """Top operators (self CPU time) of one update."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(index)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- decoding

TextFn = Callable[[list[str]], list[str]]


def mtkit_decoder(run: Path, decode: DecodeConfig, threads: int, said: list[str]) -> tuple[TextFn, Callable[[], None]]:
    """The imported run's translator as ``mtkit translate --threads N`` opens it; ``said``
    gets the line that names the engine."""
    translator = open_translator(run, decode, threads=threads, workers=threads, say=said.append)
    return translator.translate, translator.close


def hf_decoder(model_dir: Path, decode: DecodeConfig, max_positions: int, batch_size: int) -> TextFn:
    """transformers' tokenizer, ``generate`` and ``batch_decode`` on batches sorted by length,
    with mtkit's length limit."""
    from transformers import MarianMTModel, MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(model_dir)
    model = MarianMTModel.from_pretrained(model_dir).eval()

    def translate(lines: list[str]) -> list[str]:
        lengths = [len(ids) for ids in tokenizer(lines)["input_ids"]]  # with EOS, as mtkit counts
        order = sorted(range(len(lines)), key=lambda i: lengths[i])
        out = [""] * len(lines)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = tokenizer([lines[i] for i in rows], return_tensors="pt", padding=True)
            limit = min(int(decode.max_len_a * max(lengths[i] for i in rows) + decode.max_len_b), max_positions - 2)
            with torch.inference_mode():
                generated = model.generate(**inputs, max_new_tokens=limit + 1)  # + EOS
            for row, text in zip(rows, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
                out[row] = text
        return out

    return translate


def equal_length_batches(lines: list[str], tokenizers: Tokenizers, size: int, count: int) -> list[str]:
    """``count`` batches of ``size`` of ``lines``, each of one source length (in subwords),
    spread over the lengths, shortest first. ``generate`` has one length limit per batch (its
    longest sentence's), mtkit one per sentence; a random model writes up to the limit, so only
    batches of one length give both the same work."""
    by_length: dict[int, list[str]] = {}
    for line, ids in zip(lines, tokenizers.src.encode(lines), strict=True):
        by_length.setdefault(len(ids), []).append(line)
    batches = [group[i : i + size] for _, group in sorted(by_length.items())
               for i in range(0, len(group) - size + 1, size)]
    if count > len(batches):
        sys.exit(f"the test set has {len(batches)} batches of {size} sentences of one length; ask for fewer")
    picked = np.linspace(0, len(batches) - 1, count).round().astype(int)
    return [line for i in picked for line in batches[i]]


def time_decoding(decoders: dict[str, TextFn], lines: list[str], chunk: int) -> tuple[Clocks, dict[str, list[str]]]:
    """Each decoder translates ``lines`` a chunk at a time, taking turns, after translating
    the first chunk untimed (warm-up)."""
    for translate in decoders.values():
        translate(lines[:chunk])
    clocks = Clocks()
    outputs: dict[str, list[str]] = {name: [] for name in decoders}
    for start in range(0, len(lines), chunk):
        for name, translate in decoders.items():
            keep_freed_memory(name == "mtkit")
            with clocks(name):
                outputs[name] += translate(lines[start : start + chunk])
    keep_freed_memory(False)
    return clocks, outputs


# --------------------------------------------------------------------------- main


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def finetune(args: argparse.Namespace, run: Path, model_dir: Path, src: list[str], tgt: list[str]) -> dict[str, Any]:
    """The fine-tuning comparison's figures."""
    from transformers import MarianMTModel, MarianTokenizer

    train_cfg = TrainConfig(lr=args.lr, max_tokens=args.max_tokens, label_smoothing=0.1, clip_norm=1.0)
    precision = setup_runtime(train_cfg).precision  # what `mtkit train` picks on this machine
    loaded = load_for_inference(run)
    updates = Updates(loaded.tokenizers, MarianTokenizer.from_pretrained(model_dir),
                      MarianMTModel.from_pretrained(model_dir), src, tgt, args.max_tokens, args.warmup + args.steps)
    nll = nll_per_token(run, model_dir, updates)
    trainers: dict[str, Step] = {"mtkit": mtkit_trainer(run, updates, train_cfg, precision)[1],
                                 "hf": hf_trainer(model_dir, updates, train_cfg)[1]}
    if precision != "fp32":
        trainers["mtkit_fp32"] = mtkit_trainer(run, updates, train_cfg, "fp32")[1]
    say(f"fine-tuning: {', '.join(trainers)}, {args.warmup} + {args.steps} updates each")
    clocks, losses = time_training(trainers, args.warmup, args.steps, args.block)
    if args.profile:
        print(profile_update(trainers["mtkit"], args.warmup), file=sys.stderr)
    tokens = updates.target_tokens(range(args.warmup, args.warmup + args.steps))
    tok_per_s = {name: tokens / seconds for name, seconds in clocks.wall.items()}
    result: dict[str, Any] = {
        "speedup_vs_hf": tok_per_s["mtkit"] / tok_per_s["hf"],
        "mtkit_tgt_tok_per_s": tok_per_s["mtkit"],
        "hf_tgt_tok_per_s": tok_per_s["hf"],
        "mtkit_precision": precision,
    }
    if "mtkit_fp32" in tok_per_s:
        result["mtkit_fp32_tgt_tok_per_s"] = tok_per_s["mtkit_fp32"]
        result["speedup_vs_hf_fp32"] = tok_per_s["mtkit_fp32"] / tok_per_s["hf"]
    result["speedup_vs_hf_cpu_time"] = clocks.cpu["hf"] / clocks.cpu["mtkit"]
    result["first_batch_nll"] = {"mtkit": nll[0], "hf": nll[1]}
    result["mean_train_loss"] = {name: float(np.mean(values)) for name, values in losses.items()}
    result["sentences_per_update"] = float(np.mean([b.src.shape[0] for b in updates.mtkit[args.warmup :]]))
    return result


def decoding(args: argparse.Namespace, run: Path, model_dir: Path) -> dict[str, Any]:
    """The decoding comparison's figures."""
    loaded = load_for_inference(run)
    decode = loaded.config.decode
    if args.backend is not None:
        decode = decode.model_copy(update={"backend": args.backend})
    if args.compute_type is not None:
        decode = decode.model_copy(update={"compute_type": args.compute_type})
    # In length order, so that each generate() batch holds sentences of nearly one length: its
    # one length limit (the longest's) then gives the work of mtkit's per-sentence limits.
    lines = equal_length_batches(multi30k("test")[0], loaded.tokenizers, args.hf_batch, args.sentences // args.hf_batch)
    said: list[str] = []
    mtkit_translate, close = mtkit_decoder(run, decode, args.threads, said)
    decoders = {"mtkit": mtkit_translate,
                "hf": hf_decoder(model_dir, decode, loaded.config.model.max_positions, args.hf_batch)}
    say(f"decoding: {len(lines)} sentences, {', '.join(said) or 'backend ' + decode.backend}")
    try:
        clocks, outputs = time_decoding(decoders, lines, args.chunk)
    finally:
        close()
    sent_per_s = {name: len(lines) / seconds for name, seconds in clocks.wall.items()}
    same = sum(a == b for a, b in zip(outputs["mtkit"], outputs["hf"], strict=True))
    return {
        "decode_speedup_vs_hf_generate": sent_per_s["mtkit"] / sent_per_s["hf"],
        "mtkit_sent_per_s": sent_per_s["mtkit"],
        "hf_sent_per_s": sent_per_s["hf"],
        "mtkit_backend": " ".join(said) or decode.backend,
        "identical_outputs": same / len(lines),
        "mean_output_words": {name: float(np.mean([len(t.split()) for t in texts])) for name, texts in outputs.items()},
        "decode": {key: getattr(decode, key) for key in ("beam", "lenpen", "max_len_a", "max_len_b")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Marian save_pretrained directory (default: a random small one)")
    parser.add_argument("--vocab", type=int, default=8000, help="SentencePiece pieces of the random model")
    parser.add_argument("--pretrain", type=int, default=150,
                        help="updates (64 pairs each) that train the random model before it is imported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per fine-tuning batch (mtkit's buckets)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates per system")
    parser.add_argument("--steps", type=int, default=24, help="timed updates per system (0: skip fine-tuning)")
    parser.add_argument("--block", type=int, default=4, help="updates per timing block (systems alternate)")
    parser.add_argument("--sentences", type=int, default=384,
                        help="test sentences to translate, a multiple of --hf-batch (0: skip decoding)")
    parser.add_argument("--chunk", type=int, default=128, help="sentences per decoding turn, a multiple of --hf-batch")
    parser.add_argument("--hf-batch", type=int, default=32, help="sentences per generate() call")
    parser.add_argument("--backend", choices=["auto", "torch", "ctranslate2"],
                        help="mtkit's decoding backend (default: the run's decode.backend, as mtkit translate)")
    parser.add_argument("--compute-type", choices=["auto", "float32", "int8", "bfloat16"],
                        help="mtkit's decoding precision (default: the run's decode.compute_type, auto)")
    parser.add_argument("--work", type=Path,
                        help="keep the model and the imported run here and reuse them (default: a temporary directory)")
    parser.add_argument("--profile", action="store_true", help="print mtkit's top operators of one update to stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.sentences % args.hf_batch or args.chunk % args.hf_batch:
        parser.error("--sentences and --chunk must be multiples of --hf-batch (whole generate() batches)")

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    src, tgt = multi30k("train")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_finetune.") as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        model_dir = args.model or work / "marian"
        if not model_dir.exists():
            with atomic_dir(model_dir) as building:  # whole or not at all, for --work to reuse
                make_marian(building, src, tgt, args.vocab, args.pretrain)
        run = work / "run"
        if not run.exists():
            import_run(model_dir, run)
        setup_s = time.perf_counter() - started
        say(f"model built and imported in {setup_s:.0f} s")
        if args.steps:
            result.update(finetune(args, run, model_dir, src, tgt))
        if args.sentences:
            result.update(decoding(args, run, model_dir))
        loaded = load_for_inference(run)
    result["settings"] = {
        "model": str(args.model) if args.model else (f"MarianMTModel, small, {args.vocab}-piece unigram, random, "
                                                     f"trained {args.pretrain} updates"),
        "vocab_size": loaded.tokenizers.tgt.vocab_size,
        "params": loaded.model.num_parameters,
        "threads": args.threads, "max_tokens": args.max_tokens, "lr": args.lr, "timed_updates": args.steps,
        "sentences": args.sentences, "hf_batch": args.hf_batch, "setup_s": round(setup_s, 1),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    print_result(result, as_json=args.json)


if __name__ == "__main__":
    main()
