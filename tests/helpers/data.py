"""Synthetic data and tiny experiments, made by the tests themselves (no corpus on disk).

``tokdata_pairs`` makes sentence pairs whose target is a word-by-word "translation" of the
source (each word reversed plus "en"), so a tiny model can learn something in a few steps.
"""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

_SYLLABLES = ["ka", "to", "ri", "mu", "se", "na", "lo", "pe", "shi"]
_SYLLABLES += ["dra", "fen", "gul", "bor", "wix", "quo", "zat", "lem"]


def _words(seed: int, n: int = 150) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


_SRC_WORDS = _words(1)
_TGT_WORDS = [w[::-1] + "en" for w in _words(1)]


def tokdata_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct synthetic sentence pairs; the target is a word-by-word 'translation'."""
    rng = random.Random(seed)
    table = dict(zip(_SRC_WORDS, _TGT_WORDS, strict=True))
    pairs = []
    for i in range(n):
        words = [rng.choice(_SRC_WORDS) for _ in range(rng.randint(3, 12))]
        pairs.append((" ".join(words) + f" {i}", " ".join(table[w] for w in words) + f" {i}"))
    return pairs


def write_pairs(directory: Path, split: str, count: int, seed: int) -> dict[str, str]:
    """``count`` pairs of ``tokdata_pairs`` as ``directory/split.src`` and ``split.tgt``;
    returns the config's file entry ``{"src": path, "tgt": path}``."""
    pairs = tokdata_pairs(count, seed)
    files = {}
    for side, k in (("src", 0), ("tgt", 1)):
        path = directory / f"{split}.{side}"
        path.write_text("".join(p[k] + "\n" for p in pairs), encoding="utf-8")
        files[side] = str(path)
    return files


def merge_sections(config: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``config`` with each of ``sections`` merged over its section of the same name (in place)."""
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tokdata_experiment(directory: Path, n: int = 300, **sections: dict[str, Any]) -> Path:
    """``n`` synthetic training pairs (20-pair valid and test splits) under ``directory``, and
    a config reading them with a tiny tokenizer, ``sections`` merged over it. Returns the
    config's path (``directory/config.yaml``; the experiment is ``directory/run``)."""
    splits = (("train", n, 0), ("valid", 20, 1), ("test", 20, 2))
    config = {
        "experiment": {"dir": str(directory / "run")},
        "data": {split: write_pairs(directory, split, count, seed) for split, count, seed in splits},
        "tokenizer": {"vocab_size": 120, "num_threads": 1},
    }
    return write_config(directory / "config.yaml", merge_sections(config, sections))


TRAINKIT_SECTIONS: dict[str, dict[str, Any]] = {
    "model": {"size": "tiny", "dropout": 0.1},
    "train": {
        "max_tokens": 300, "max_steps": 8, "warmup_steps": 2, "lr": 0.003, "log_every": 2,
        "valid_every": 4, "valid_bleu": False, "best_metric": "loss", "keep_last": 2,
        "threads": 1,  # tiny matrices: more threads only contend (badly so on a busy machine)
        "precision": "fp32",  # exact comparisons (resume, DDP); auto is bf16 on CPUs with native bf16
    },
    "decode": {"beam": 1, "max_len_a": 1.2, "max_len_b": 3},
}
"""A tiny model trained 8 steps, validated (loss only) and checkpointed every 4."""


def prepared_experiment(directory: Path) -> dict[str, Any]:
    """300 synthetic pairs (20 valid), a 120-piece tokenizer and the prepared data under
    ``directory/run``, with ``TRAINKIT_SECTIONS``. Returns the config as a dict."""
    from mtkit.config import validate_config
    from mtkit.corpus import training_text
    from mtkit.data import prepare
    from mtkit.tokenizer import tokenizer_dir, train_tokenizers

    data = {split: write_pairs(directory, split, count, seed) for split, count, seed in (("train", 300, 0),
                                                                                         ("valid", 20, 1))}
    config = {"experiment": {"dir": str(directory / "run")}, "data": data,
              "tokenizer": {"vocab_size": 120, "num_threads": 1}, **copy.deepcopy(TRAINKIT_SECTIONS)}
    cfg = validate_config(config)
    train_tokenizers(cfg.tokenizer, tokenizer_dir(cfg), lambda sides: training_text(cfg.data, sides))
    prepare(cfg)
    return config


def copy_experiment(prepared: dict[str, Any], run_dir: Path, config_path: Path, *, data: bool = True,
                    **sections: dict[str, Any]) -> Path:
    """A copy of the ``prepared`` experiment in ``run_dir`` (without checkpoints and logs, and
    without its prepared data unless ``data``) and its config at ``config_path``, with
    ``sections`` merged over it. Returns ``config_path``."""
    config = copy.deepcopy(prepared)
    ignore = ["checkpoints", "tensorboard", "*.jsonl"] + ([] if data else ["data"])
    shutil.copytree(config["experiment"]["dir"], run_dir, ignore=shutil.ignore_patterns(*ignore))
    config["experiment"]["dir"] = str(run_dir)
    return write_config(config_path, merge_sections(config, sections))


def random_checkpoint(prepared: dict[str, Any], directory: Path) -> Path:
    """``directory/model``: a run directory holding one checkpoint of a random tiny model on
    the ``prepared`` experiment's tokenizer (for translate)."""
    import torch

    from mtkit.checkpoint import save_checkpoint
    from mtkit.config import validate_config
    from mtkit.models.encoder_decoder import Transformer
    from mtkit.tokenizer import Tokenizers, tokenizer_dir

    config = validate_config({**prepared, "experiment": {"dir": str(directory / "model")}})
    tokenizers = Tokenizers.load(tokenizer_dir(validate_config(prepared)))
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    save_checkpoint(directory / "model" / "checkpoints", step=1, epoch=0, model=model, config=config,
                    tokenizers=tokenizers, metrics={}, trainer_state={}, best=True, keep_last=1)
    return directory / "model"
