"""Benchmark the checksums of prepared splits and checkpoint weights (``mtkit.integrity``)
against reading the same files.

    .venv/bin/python scripts/bench/bench_checksum.py [--json] [--pairs 1000000] [--vocab 32000] [--repeat 3]

It writes, into a temporary directory:

- a prepared ``train.arrow`` of ``--pairs`` synthetic pairs in mtkit's split layout (random ids
  below ``--vocab``, 4-40 subwords a side, about 4.5 characters of text per subword) and the
  report that ``mtkit prepare`` writes beside it;
- the weights of a ``base`` Transformer (d_model 512, 6+6 layers) with a joint ``--vocab``
  vocabulary, as ``model.safetensors``.

Then it times, in this process, with the files in the page cache (best of ``--repeat``):

- ``split_read_s``: reading every byte of the split once (the peer of the checksum);
- ``split_hash_s``: its checksum (what ``prepare`` adds after writing, ``load_split`` before reading);
- ``split_open_s``: pyarrow opening it by memory map (what ``load_split`` did before checksums);
- ``split_load_s``: ``load_split`` whole: checksum, open, Arrow validation, id range check;
- ``weights_load_s``: safetensors loading the weights into the model (``load_model``);
- ``weights_hash_s``: their checksum (what ``load_weights`` adds before loading).

Ratios: ``ratio_to_read`` = split_hash_s / split_read_s; ``weights_ratio_to_load`` =
weights_hash_s / weights_load_s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_model, save_model

from mtkit.config import ModelConfig
from mtkit.data import FORMAT, SCHEMA, load_split, split_file
from mtkit.integrity import ALGORITHM, file_checksum
from mtkit.models.encoder_decoder import Transformer

MB = 1e6


def best_of(repeat: int, work: Callable[[], object]) -> float:
    """The shortest wall-clock time of ``repeat`` runs of ``work``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(path: Path) -> None:
    """Read every byte of ``path`` once, in the blocks the checksum reads."""
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def synthetic_batch(rng: np.random.Generator, rows: int, vocab: int) -> pa.RecordBatch:
    """``rows`` random pairs in the schema of a prepared split."""

    def ids(lengths: np.ndarray) -> pa.Array:
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(4, vocab, size=int(offsets[-1]), dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    def text(lengths: np.ndarray) -> pa.Array:
        chars = (lengths * 4.5).astype(np.int32)
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(chars, out=offsets[1:])
        letters = rng.integers(ord("a"), ord("z") + 1, size=int(offsets[-1]), dtype=np.uint8)
        letters[rng.random(len(letters)) < 0.18] = ord(" ")
        return pa.Array.from_buffers(pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(letters)])

    src_len = rng.integers(4, 41, size=rows, dtype=np.int32)
    tgt_len = rng.integers(4, 41, size=rows, dtype=np.int32)
    columns = [text(src_len), text(tgt_len), ids(src_len), ids(tgt_len), pa.array(src_len), pa.array(tgt_len)]
    return pa.record_batch(columns, schema=SCHEMA)


def write_split(exp_dir: Path, pairs: int, vocab: int) -> Path:
    """A prepared experiment directory holding only a ``train`` split of ``pairs`` pairs."""
    data = exp_dir / "data"
    data.mkdir(parents=True)
    path = split_file(data, "train")
    rng = np.random.default_rng(0)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for start in range(0, pairs, 100_000):
            writer.write_batch(synthetic_batch(rng, min(100_000, pairs - start), vocab))
    report = {"format": FORMAT, "tokenizer_fingerprint": "synthetic", "src_vocab_size": vocab,
              "tgt_vocab_size": vocab, "files": {path.name: path.stat().st_size},
              "checksums": {path.name: file_checksum(path)}}
    (data / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return path


def measure(pairs: int, vocab: int, repeat: int) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split = write_split(root / "run", pairs, vocab)
        split_s = {
            "read": best_of(repeat, lambda: read_all(split)),
            "hash": best_of(repeat, lambda: file_checksum(split)),
            "open": best_of(repeat, lambda: pa.ipc.open_file(pa.memory_map(str(split))).read_all()),
            "load": best_of(repeat, lambda: load_split(root / "run", "train")),
        }
        split_mb = split.stat().st_size / MB
        split.unlink()

        model = Transformer(ModelConfig(size="base"), vocab, vocab)
        weights = root / "model.safetensors"
        save_model(model, str(weights))
        weights_mb = weights.stat().st_size / MB
        weights_s = {
            "load": best_of(repeat, lambda: load_model(model, str(weights))),
            "hash": best_of(repeat, lambda: file_checksum(weights)),
        }
    return {
        "algorithm": ALGORITHM,
        "split_pairs": pairs,
        "split_mb": round(split_mb, 1),
        "split_read_s": round(split_s["read"], 4),
        "split_hash_s": round(split_s["hash"], 4),
        "split_open_s": round(split_s["open"], 4),
        "split_load_s": round(split_s["load"], 4),
        "hash_mb_s": round(split_mb / split_s["hash"]),
        "ratio_to_read": round(split_s["hash"] / split_s["read"], 2),
        "base_weights_mb": round(weights_mb, 1),
        "weights_load_s": round(weights_s["load"], 4),
        "weights_hash_s": round(weights_s["hash"], 4),
        "weights_ratio_to_load": round(weights_s["hash"] / weights_s["load"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="Pairs in the synthetic split.")
    parser.add_argument("--vocab", type=int, default=32000, help="Vocabulary size (ids and the model's embeddings).")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each measurement; the fastest counts.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.pairs, args.vocab, args.repeat)
    if args.json:
        print(json.dumps(result))
        return
    print(f"checksum {result['algorithm']}, files in the page cache, best of {args.repeat}")
    print(f"split:   {result['split_pairs']:,} pairs, {result['split_mb']} MB: read {result['split_read_s']} s, "
          f"checksum {result['split_hash_s']} s ({result['hash_mb_s']} MB/s, x{result['ratio_to_read']} of a read); "
          f"pyarrow open {result['split_open_s']} s, load_split (all checks) {result['split_load_s']} s")
    print(f"weights: base, {result['base_weights_mb']} MB: safetensors load {result['weights_load_s']} s, "
          f"checksum {result['weights_hash_s']} s (x{result['weights_ratio_to_load']} of the load)")


if __name__ == "__main__":
    main()
