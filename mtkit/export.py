"""Export a trained model to other runtimes: Hugging Face Marian and CTranslate2.

A decoder-only model (``model.arch: decoder_only``) exports to CTranslate2 only, as a
``Generator`` model (``TransformerDecoderModelSpec``) prompted with ``source </s> <s>``; that
runtime attends causally and counts positions through the prompt, so the model must use
``source_attention: causal`` and ``target_positions: continue``.

Each exporter follows one template (after CTranslate2's converters): refuse an existing
output directory unless forced -> load the checkpoint -> check that the runtime can
represent every architecture option (one line per problem, naming the config key) ->
write into a hidden temporary directory -> rename it into place. A failed or killed
export never leaves an output that looks complete.

Weight names map one-to-one (``mtkit.model`` follows Marian's names); only the fused
projections are split (Marian) or kept fused (CTranslate2 fuses them the same way):

    self_attn.qkv_proj  (3D, D)  = q, k, v stacked   -> Marian q_proj, k_proj, v_proj
    encoder_attn.kv_proj (2D, D) = k, v stacked      -> Marian k_proj, v_proj

Token ids are fixed by ``mtkit.vocab``: PAD 0 ``<pad>``, UNK 1 ``<unk>``, BOS 2 ``<s>``
(the decoder's start token), EOS 3 ``</s>``.

``transformers`` is optional (``pip install 'mtkit[bench]'``); ``ctranslate2`` is a dependency
of mtkit that may still be missing (mtkit then translates with PyTorch). Both are imported only
when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mtkit.checkpoint import Loaded, load_for_inference
from mtkit.config import DecodeConfig, ModelConfig
from mtkit.decoder_only import Block, DecoderOnly
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, atomic_write_text, fsync_path, refuse_overlap
from mtkit.integrity import damage, file_checksum
from mtkit.model import DecoderLayer, EncoderLayer, Transformer
from mtkit.search import Hypothesis
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
POST_NORM_HINT = "train with `model.norm: post`"


def require(module: str) -> ModuleType:
    """Import an optional runtime, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        how = "pip install ctranslate2" if package == "ctranslate2" else "pip install 'mtkit[bench]'"
        raise MtkitError(f"{package} is not installed; run: {how}") from None


# --------------------------------------------------------------------------- the template


class Exporter(ABC):
    """One target runtime. ``problems`` says what the runtime cannot represent; ``write``
    fills an empty directory. Run both through ``export``."""

    name: ClassVar[str]

    @abstractmethod
    def problems(self, loaded: Loaded) -> list[str]:
        """One line per architecture option the runtime cannot represent (empty: exportable)."""

    @abstractmethod
    def write(self, loaded: Loaded, directory: Path) -> None:
        """Write the exported model into the empty ``directory``."""


def export(exporter: Exporter, source: Path | Loaded, out_dir: Path, force: bool = False) -> Path:
    """Export ``source`` (a run or checkpoint directory, or an already loaded checkpoint)
    to ``out_dir``. An existing ``out_dir`` is replaced only with ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise MtkitError(f"{out_dir}: already exists; pass --force to replace it")
    loaded = source if isinstance(source, Loaded) else load_for_inference(Path(source))
    refuse_overlap(out_dir, [loaded.path], "the checkpoint")
    problems = exporter.problems(loaded)
    if problems:
        raise MtkitError(f"cannot export to {exporter.name}: " + "; ".join(problems))
    with atomic_dir(out_dir) as tmp:
        exporter.write(loaded, tmp)
    return out_dir


def _pieces(path: Path) -> list[str]:
    """The SentencePiece vocabulary in id order."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(path))
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _special_problems(loaded: Loaded) -> list[str]:
    problems = []
    for side in ("src", "tgt"):
        pieces = _pieces(getattr(loaded.tokenizers, side).path)
        for token_id, piece in SPECIAL_PIECES.items():
            if token_id >= len(pieces) or pieces[token_id] != piece:
                found = pieces[token_id] if token_id < len(pieces) else "nothing"
                problems.append(f"tokenizer ({side}): id {token_id} is {found!r}, expected {piece!r}")
    return problems


# --------------------------------------------------------------------------- Hugging Face Marian


class HuggingFaceExporter(Exporter):
    """A ``MarianMTModel`` directory: config.json, model.safetensors, generation_config.json
    and a ``MarianTokenizer`` (source.spm, target.spm, vocab.json)."""

    name = "huggingface"

    def problems(self, loaded: Loaded) -> list[str]:
        cfg = loaded.config.model
        if cfg.arch != "encoder_decoder":
            return [f"model.arch={cfg.arch}: Marian is an encoder-decoder; export a causal decoder-only "
                    "model to ctranslate2 instead"]
        problems = []
        if cfg.norm != "post":
            problems.append(
                f"model.norm={cfg.norm}: Marian is post-norm (no final layer norms); {POST_NORM_HINT}"
                " (or export to ctranslate2, which supports pre-norm)"
            )
        if cfg.positions != "sinusoidal":
            problems.append(
                f"model.positions={cfg.positions}: Marian only has fixed sinusoidal positions;"
                " train with `model.positions: sinusoidal`"
            )
        elif loaded.model.src_embed.embedding_dim % 2:
            problems.append(f"model.d_model={cfg.d_model}: Marian's sinusoidal table differs for odd widths")
        return problems + _special_problems(loaded)

    def write(self, loaded: Loaded, directory: Path) -> None:
        transformers = require("transformers")
        transformers.utils.logging.disable_progress_bar()
        ours = cast(Transformer, loaded.model)  # problems() refuses the other architectures
        model = marian_model(loaded.config.model, ours.src_embed.num_embeddings, ours.tgt_embed.num_embeddings,
                             loaded.tokenizers.joint).eval()
        weights = marian_state_dict(ours)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as err:  # a mapping bug, not a user mistake: keep the detail
            raise RuntimeError(f"mtkit -> Marian weight mapping does not fit: {err}") from err
        _check_marian_positions(model, ours)
        model.generation_config = marian_generation_config(loaded)
        model.save_pretrained(directory)
        self._write_tokenizer(loaded, directory)

    @staticmethod
    def _write_tokenizer(loaded: Loaded, directory: Path) -> None:
        tokenizers = loaded.tokenizers
        shutil.copyfile(tokenizers.src.path, directory / "source.spm")
        shutil.copyfile(tokenizers.tgt.path, directory / "target.spm")
        src_vocab = {piece: i for i, piece in enumerate(_pieces(tokenizers.src.path))}
        tgt_vocab = {piece: i for i, piece in enumerate(_pieces(tokenizers.tgt.path))}
        separate = src_vocab != tgt_vocab
        atomic_write_text(directory / "vocab.json", json.dumps(src_vocab, ensure_ascii=False, indent=1))
        if separate:
            atomic_write_text(directory / "target_vocab.json", json.dumps(tgt_vocab, ensure_ascii=False, indent=1))
        data = loaded.config.data
        tokenizer_config = {
            "tokenizer_class": "MarianTokenizer",
            "source_lang": data.src_lang,
            "target_lang": data.tgt_lang,
            "separate_vocabs": separate,
            "unk_token": "<unk>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "model_max_length": loaded.config.model.max_positions,
        }
        if separate:
            tokenizer_config["target_vocab_file"] = "target_vocab.json"
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")


def marian_config(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Any:
    """The ``MarianConfig`` of the Hugging Face counterpart of
    ``mtkit.model.Transformer(cfg, src_vocab_size, tgt_vocab_size, joint_vocab)``: same layers,
    widths, heads, activation, dropouts, embedding sharing and tying, mtkit's special token ids.
    Marian is post-norm with sinusoidal positions; ``HuggingFaceExporter.problems`` says when
    an mtkit model differs."""
    transformers = require("transformers")
    # Embeddings are shared under the rule Transformer applies; an export whose model decided
    # otherwise fails its strict weight loading.
    shared = cfg.share_embeddings and joint_vocab and src_vocab_size == tgt_vocab_size
    return transformers.MarianConfig(
        vocab_size=src_vocab_size,
        decoder_vocab_size=tgt_vocab_size,
        share_encoder_decoder_embeddings=shared,
        tie_word_embeddings=cfg.tie_output,
        max_position_embeddings=cfg.max_positions,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        activation_function=cfg.activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        scale_embedding=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=EOS_ID,
    )


def marian_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Any:
    """A randomly initialised ``MarianMTModel`` of ``marian_config(...)`` (the peer that the
    benchmarks train, and the container the Marian export loads mtkit's weights into)."""
    transformers = require("transformers")
    return transformers.MarianMTModel(marian_config(cfg, src_vocab_size, tgt_vocab_size, joint_vocab))


def marian_generation_config(loaded: Loaded, decode: DecodeConfig | None = None) -> Any:
    """Generation settings as close to mtkit's decoding as ``generate()`` allows: beam size,
    length-penalty alpha, minimum length, start/end tokens, PAD and BOS never generated, EOS
    forced at the maximum length. Two differences remain: Marian divides scores by
    ``length ** alpha`` where mtkit divides by GNMT's ``((5 + length) / 6) ** alpha``, and
    ``max_length`` is fixed (the model's ``max_positions``; pass ``max_new_tokens`` to
    generate) rather than ``max_len_a * source_length + max_len_b``."""
    transformers = require("transformers")
    decode = decode or loaded.config.decode
    return transformers.GenerationConfig(
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        forced_eos_token_id=EOS_ID,
        bad_words_ids=[[PAD_ID], [BOS_ID]],
        num_beams=decode.beam,
        length_penalty=decode.lenpen,
        max_length=loaded.config.model.max_positions,
        min_new_tokens=decode.min_len,
        early_stopping=True,
    )


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """mtkit ``Transformer`` weights under ``MarianMTModel`` names (fused projections split).
    Every key of ``MarianMTModel.state_dict()`` is present, so loading can be strict."""
    out: dict[str, Tensor] = {}
    d_model = model.src_embed.embedding_dim
    shared = model.src_embed is model.tgt_embed
    if shared:
        out["model.shared.weight"] = model.src_embed.weight
    out["model.encoder.embed_tokens.weight"] = model.src_embed.weight
    out["model.decoder.embed_tokens.weight"] = model.tgt_embed.weight
    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_positions.weight"] = model.positions.weight
    out["lm_head.weight"] = model.output_proj.weight
    out["final_logits_bias"] = torch.zeros(1, model.output_proj.out_features)

    def linear(name: str, module: torch.nn.Linear) -> None:
        out[f"{name}.weight"] = module.weight
        out[f"{name}.bias"] = module.bias

    def split(names: list[str], module: torch.nn.Linear) -> None:
        weights = module.weight.split(d_model, dim=0)
        biases = module.bias.split(d_model, dim=0)
        for name, weight, bias in zip(names, weights, biases, strict=True):
            out[f"{name}.weight"], out[f"{name}.bias"] = weight, bias

    def ffn_and_norms(prefix: str, layer: EncoderLayer | DecoderLayer, norms: list[str]) -> None:
        linear(f"{prefix}.fc1", layer.ffn.fc1)
        linear(f"{prefix}.fc2", layer.ffn.fc2)
        for norm in norms:
            linear(f"{prefix}.{norm}", getattr(layer, norm))

    for i, layer in enumerate(_encoder_layers(model)):
        prefix = f"model.encoder.layers.{i}"
        split([f"{prefix}.self_attn.{p}_proj" for p in "qkv"], layer.self_attn.qkv_proj)
        linear(f"{prefix}.self_attn.out_proj", layer.self_attn.out_proj)
        ffn_and_norms(prefix, layer, ["self_attn_layer_norm", "final_layer_norm"])
    for i, dec_layer in enumerate(_decoder_layers(model)):
        prefix = f"model.decoder.layers.{i}"
        split([f"{prefix}.self_attn.{p}_proj" for p in "qkv"], dec_layer.self_attn.qkv_proj)
        linear(f"{prefix}.self_attn.out_proj", dec_layer.self_attn.out_proj)
        linear(f"{prefix}.encoder_attn.q_proj", dec_layer.encoder_attn.q_proj)
        split([f"{prefix}.encoder_attn.{p}_proj" for p in "kv"], dec_layer.encoder_attn.kv_proj)
        linear(f"{prefix}.encoder_attn.out_proj", dec_layer.encoder_attn.out_proj)
        ffn_and_norms(prefix, dec_layer, ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"])
    return {name: tensor.detach().cpu().float().contiguous() for name, tensor in out.items()}


def _encoder_layers(model: Transformer) -> list[EncoderLayer]:
    """The encoder's layers with their type (an ``nn.ModuleList`` yields plain modules)."""
    return [cast(EncoderLayer, layer) for layer in model.encoder_layers]


def _decoder_layers(model: Transformer) -> list[DecoderLayer]:
    """The decoder's layers with their type."""
    return [cast(DecoderLayer, layer) for layer in model.decoder_layers]


def _check_marian_positions(marian: Any, model: Transformer) -> None:
    """Marian recomputes its sinusoidal table when loading (it is not saved): it must be ours."""
    theirs = marian.model.encoder.embed_positions.create_weight()
    if not torch.allclose(theirs, model.positions.weight.cpu(), atol=1e-5):
        raise MtkitError("model.positions: Marian's sinusoidal layout differs from mtkit's; cannot export")


# --------------------------------------------------------------------------- CTranslate2


class CTranslate2Exporter(Exporter):
    """A CTranslate2 model directory: model.bin, config.json, the vocabularies and the
    SentencePiece model(s) (source.spm, target.spm). Pre- and post-norm, sinusoidal and
    learned positions are all representable."""

    name = "ctranslate2"

    def __init__(self, quantization: str | None = None):
        self.quantization = quantization

    def problems(self, loaded: Loaded) -> list[str]:
        accepted = require("ctranslate2.specs.model_spec").ACCEPTED_MODEL_TYPES
        problems = []
        if self.quantization is not None and self.quantization not in accepted:
            problems.append(f"--quantization {self.quantization}: expected one of {', '.join(accepted)}")
        if isinstance(loaded.model, DecoderOnly):
            problems += _generator_problems(loaded.config.model, loaded.model)
        return problems + _special_problems(loaded)

    def write(self, loaded: Loaded, directory: Path) -> None:
        model = loaded.model
        spec = ctranslate2_generator_spec(loaded, model) if isinstance(model, DecoderOnly) else ctranslate2_spec(loaded)
        spec.validate()
        spec.optimize(quantization=self.quantization)
        spec.save(str(directory))
        shutil.copyfile(loaded.tokenizers.src.path, directory / "source.spm")
        shutil.copyfile(loaded.tokenizers.tgt.path, directory / "target.spm")


CT2_PREFIX = "ctranslate2-"
"""Converted models live in ``{checkpoint}/ctranslate2-{key}/`` (or the cache directory)."""
CT2_MARKER = "complete.json"
"""Written last into a conversion, after its other files are on disk: their sizes and checksums.
A conversion without it is incomplete; one whose files differ from it is damaged."""
_CT2_CONVERTER_VERSION = 2  # bump when ctranslate2_spec changes what it writes


class DamagedConversion(MtkitError):
    """A complete CTranslate2 conversion whose files no longer match its marker."""


def ct2_model_dir(loaded: Loaded, warn: Callable[[str], None], *, repair: bool = True) -> Path:
    """The CTranslate2 conversion of ``loaded``, made on first use and reused afterwards.

    It is keyed by a hash of the weights ``loaded`` holds (not of the file, which may have
    changed since), the model config, the tokenizers and the versions of the converter and of
    ctranslate2, so a stale conversion is never used (it is replaced, and removed). Written
    into the checkpoint directory, or where that is read-only into ``mtkit_cache_dir()``
    (``warn`` says so), through a temporary directory renamed into place whole; it counts once
    its marker (``CT2_MARKER``, written last) is there, and is used only while every file
    matches the marker, which is checked on each call, before CTranslate2 reads a byte. A
    damaged conversion is converted again, or with ``repair`` False raises DamagedConversion.
    Two processes converting at once each finish their own and the second rename loses to the
    first, harmlessly. MtkitError when neither place is writable."""
    require("ctranslate2")
    name = CT2_PREFIX + _ct2_key(loaded)
    checkpoint = Path(loaded.path).resolve()
    # One cache folder per checkpoint path, so that pruning stale conversions stays within it.
    folder = hashlib.blake2b(str(checkpoint).encode(), digest_size=8).hexdigest()
    places = [checkpoint, mtkit_cache_dir() / "ctranslate2" / folder]
    problems = []
    for number, parent in enumerate(places):
        target = parent / name
        if target.is_dir():
            problem = _conversion_damage(target)
            if problem is None:
                return target
            if (target / CT2_MARKER).exists():
                if not repair:
                    raise DamagedConversion(f"{target}: damaged CTranslate2 model ({problem})")
                warn(f"{target}: damaged CTranslate2 model ({problem}); converting it again")
        try:
            _convert_into(loaded, target)
        except OSError as err:
            problems.append(f"{parent}: {err.strerror or err}")
            continue
        if number:
            warn(f"{places[0]}: not writable; the CTranslate2 model is in {target}")
        return target
    raise MtkitError("cannot store the CTranslate2 model: " + "; ".join(problems))


def mtkit_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mtkit`` (default ``~/.cache/mtkit``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mtkit"


def _ct2_key(loaded: Loaded) -> str:
    """A hash of what the conversion is made from: the weights in memory (names, types, shapes,
    bytes), the model config, the tokenizer files and the converter's and ctranslate2's versions."""
    import xxhash

    ctranslate2 = require("ctranslate2")
    digest = xxhash.xxh3_64()
    header = {"converter": _CT2_CONVERTER_VERSION, "ctranslate2": ctranslate2.__version__,
              "model": loaded.config.model.model_dump(mode="json")}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for path in loaded.tokenizers.model_files():
        digest.update(file_checksum(path).encode())
    return digest.hexdigest()


def _conversion_damage(directory: Path) -> str | None:
    """None when ``directory`` holds a complete conversion whose files match its marker; else
    what is wrong, in words."""
    try:
        marker = json.loads((directory / CT2_MARKER).read_text(encoding="utf-8"))
        sizes, checksums = marker["files"], marker["checksums"]
        if not isinstance(checksums, dict) or not isinstance(sizes, dict) or "model.bin" not in checksums:
            raise TypeError
    except FileNotFoundError:
        return f"incomplete: no {CT2_MARKER}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {CT2_MARKER}"
    for name, checksum in checksums.items():
        size = sizes.get(name)
        problem = damage(directory / name, size if isinstance(size, int) else None, str(checksum))
        if problem is not None:
            return f"{name} {problem}"
    return None


def _convert_into(loaded: Loaded, target: Path) -> None:
    """Convert into a temporary directory beside ``target`` and rename it to ``target``,
    replacing an incomplete or damaged one; a concurrent conversion that got there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        CTranslate2Exporter().write(loaded, tmp)
        files = sorted(path.name for path in tmp.iterdir() if path.is_file())
        for name in files:
            fsync_path(tmp / name)
        marker = {"files": {name: (tmp / name).stat().st_size for name in files},
                  "checksums": {name: file_checksum(tmp / name) for name in files}}
        # A plain write: the rename of the directory below is the atomic step.
        (tmp / CT2_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        fsync_path(tmp / CT2_MARKER)
        tmp.chmod(0o755)
        if target.exists() and _conversion_damage(target) is not None:
            aside = target.with_name(f".{target.name}.old-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _conversion_damage(target) is not None:
                raise
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in target.parent.glob(CT2_PREFIX + "*"):
        if stale.name != target.name and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


_CT2_ACTIVATIONS = {"relu": "RELU", "gelu": "GELU"}


def ctranslate2_spec(loaded: Loaded) -> Any:
    """A ``ctranslate2.specs.TransformerSpec`` holding ``loaded.model``'s weights and vocabularies."""
    require("ctranslate2")
    from ctranslate2.specs import common_spec, transformer_spec

    cfg, model = loaded.config.model, cast(Transformer, loaded.model)
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        cfg.heads,
        pre_norm=cfg.norm == "pre",
        activation=getattr(common_spec.Activation, _CT2_ACTIVATIONS[cfg.activation]),
    )
    positions = _numpy(model.positions.weight)
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _numpy(model.src_embed.weight)
    decoder.embeddings.weight = _numpy(model.tgt_embed.weight)
    for stack in (encoder, decoder):
        stack.scale_embeddings = True  # multiply by sqrt(d_model), as mtkit does
        stack.position_encodings.encodings = positions
    for layer_spec, layer in zip(encoder.layer, _encoder_layers(model), strict=True):
        _ct2_linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        _ct2_linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _ct2_norm(layer_spec.self_attention.layer_norm, layer.self_attn_layer_norm)
        _ct2_ffn(layer_spec.ffn, layer)
    for layer_spec, dec_layer in zip(decoder.layer, _decoder_layers(model), strict=True):
        _ct2_linear(layer_spec.self_attention.linear[0], dec_layer.self_attn.qkv_proj)
        _ct2_linear(layer_spec.self_attention.linear[1], dec_layer.self_attn.out_proj)
        _ct2_norm(layer_spec.self_attention.layer_norm, dec_layer.self_attn_layer_norm)
        _ct2_linear(layer_spec.attention.linear[0], dec_layer.encoder_attn.q_proj)
        _ct2_linear(layer_spec.attention.linear[1], dec_layer.encoder_attn.kv_proj)
        _ct2_linear(layer_spec.attention.linear[2], dec_layer.encoder_attn.out_proj)
        _ct2_norm(layer_spec.attention.layer_norm, dec_layer.encoder_attn_layer_norm)
        _ct2_ffn(layer_spec.ffn, dec_layer)
    if cfg.norm == "pre":  # pre-norm stacks end with a LayerNorm (post-norm: an Identity)
        _ct2_norm(encoder.layer_norm, cast(nn.LayerNorm, model.encoder_layer_norm))
        _ct2_norm(decoder.layer_norm, cast(nn.LayerNorm, model.decoder_layer_norm))
    decoder.projection.weight = _numpy(model.output_proj.weight)

    spec.config.layer_norm_epsilon = _encoder_layers(model)[0].final_layer_norm.eps
    spec.config.unk_token = SPECIAL_PIECES[UNK_ID]
    spec.config.bos_token = SPECIAL_PIECES[BOS_ID]
    spec.config.eos_token = SPECIAL_PIECES[EOS_ID]
    spec.config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
    spec.config.add_source_eos = True  # mtkit's sources end with EOS (see mtkit.batching)
    spec.register_source_vocabulary(_pieces(loaded.tokenizers.src.path))
    spec.register_target_vocabulary(_pieces(loaded.tokenizers.tgt.path))
    return spec


def _generator_problems(cfg: ModelConfig, model: DecoderOnly) -> list[str]:
    """What a CTranslate2 ``Generator`` cannot represent of a decoder-only model."""
    problems = []
    if cfg.source_attention != "causal":
        problems.append(f"model.source_attention={cfg.source_attention}: CTranslate2 runs decoder-only models "
                        "with causal attention only; train with `model.source_attention: causal`")
    if cfg.target_positions != "continue":
        problems.append(f"model.target_positions={cfg.target_positions}: CTranslate2 counts positions through "
                        "the prompt; train with `model.target_positions: continue`")
    if model.src_embed is not model.tgt_embed:
        problems.append("model.share_embeddings: a CTranslate2 generator has one vocabulary and embedding; "
                        "train with `tokenizer.joint: true` and `model.share_embeddings: true`")
    return problems


def ctranslate2_generator_spec(loaded: Loaded, model: DecoderOnly) -> Any:
    """A ``ctranslate2.specs.TransformerDecoderModelSpec`` holding a causal decoder-only model's
    weights and its (joint) vocabulary; each block is a decoder layer without cross-attention."""
    require("ctranslate2")
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = loaded.config.model
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        cfg.decoder_layers,
        cfg.heads,
        pre_norm=cfg.norm == "pre",
        activation=getattr(common_spec.Activation, _CT2_ACTIVATIONS[cfg.activation]),
    )
    decoder = spec.decoder
    decoder.embeddings.weight = _numpy(model.tgt_embed.weight)
    decoder.scale_embeddings = True  # multiply by sqrt(d_model), as mtkit does
    decoder.position_encodings.encodings = _numpy(model.positions.weight)
    for layer_spec, layer in zip(decoder.layer, model.layers, strict=True):
        block = cast(Block, layer)
        _ct2_linear(layer_spec.self_attention.linear[0], block.self_attn.qkv_proj)
        _ct2_linear(layer_spec.self_attention.linear[1], block.self_attn.out_proj)
        _ct2_norm(layer_spec.self_attention.layer_norm, block.self_attn_layer_norm)
        _ct2_ffn(layer_spec.ffn, block)
    if cfg.norm == "pre":
        _ct2_norm(decoder.layer_norm, cast(nn.LayerNorm, model.layer_norm))
    decoder.projection.weight = _numpy(model.output_proj.weight)
    spec.config.layer_norm_epsilon = cast(Block, model.layers[0]).final_layer_norm.eps
    spec.config.unk_token = SPECIAL_PIECES[UNK_ID]
    spec.config.bos_token = SPECIAL_PIECES[BOS_ID]
    spec.config.eos_token = SPECIAL_PIECES[EOS_ID]
    spec.register_vocabulary(_pieces(loaded.tokenizers.tgt.path))
    return spec


def _numpy(tensor: Tensor) -> Any:
    """A copy: CTranslate2's quantization rewrites the arrays in place, and a view would
    quantize the live model's own weights."""
    return tensor.detach().float().cpu().numpy().copy()


def _ct2_linear(spec: Any, module: nn.Linear) -> None:
    spec.weight = _numpy(module.weight)
    if module.bias is not None:
        spec.bias = _numpy(module.bias)


def _ct2_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _numpy(norm.weight), _numpy(norm.bias)


def _ct2_ffn(spec: Any, layer: EncoderLayer | DecoderLayer | Block) -> None:
    _ct2_linear(spec.linear_0, layer.ffn.fc1)
    _ct2_linear(spec.linear_1, layer.ffn.fc2)
    _ct2_norm(spec.layer_norm, layer.final_layer_norm)


# --------------------------------------------------------------------------- translating with CTranslate2


class CT2Translator:
    """Text in, text out through a CTranslate2 model exported by mtkit, decoding as mtkit
    does (``search`` is the CTranslate2 backend of ``mtkit.translate.Translator``): same beam
    size, n-best, minimum length, length penalty (``length`` form: CTranslate2 divides by
    length ** lenpen, the EOS counted as mtkit counts it), sampling settings and prefixes, PAD
    and BOS never generated, at most ``floor(max_len_a * (source_length + 1) + max_len_b)``
    tokens (the source length counts its EOS, as in ``mtkit.search``). CTranslate2 takes one
    length limit per call, so with ``exact_lengths`` sentences with different limits go in
    separate calls (exact); without it a batch uses its longest sentence's limit (for the
    benchmark's bare baseline). Calls of ``search`` run concurrently on ``inter_threads``
    threads of ``intra_threads`` each; with ``decode.sampling``, on one thread of
    ``max(intra_threads, inter_threads)``, so that a seed gives the same samples every run.

    Scores are mtkit's: where CTranslate2 leaves out a prefix's tokens, or the EOS that mtkit
    forces at the maximum length, the hypothesis is scored again whole (``score_batch``). Both
    end a sentence's beam search once ``beam`` hypotheses have finished (``mtkit.search`` under
    the length form). One difference remains: CTranslate2 renormalises the probabilities over
    the tokens it allows (no PAD, BOS, nor EOS before the minimum length), mtkit does not, so
    scores differ by the probability the model gives those, and where candidates are that close
    the two can pick different translations."""

    def __init__(
        self,
        model_dir: Path,
        tokenizers: Any,
        decode: DecodeConfig,
        *,
        device: str = "cpu",
        device_index: int = 0,
        compute_type: str = "default",
        intra_threads: int = 0,
        inter_threads: int = 1,
        exact_lengths: bool = True,
        max_positions: int | None = None,
    ):
        ctranslate2 = require("ctranslate2")
        if decode.sampling and inter_threads > 1:
            # Each inter thread draws from its own generator (seeded by ctranslate2.set_random_seed
            # at its first draw) and takes whichever batch comes next: which batch gets which draws
            # would change from run to run. One thread takes the batches in order instead.
            intra_threads, inter_threads = max(intra_threads, inter_threads), 1
        self.translator = ctranslate2.Translator(
            str(model_dir), device=device, device_index=device_index, compute_type=compute_type,
            intra_threads=intra_threads, inter_threads=inter_threads,
        )
        self.tokenizers, self.decode, self.exact_lengths = tokenizers, decode, exact_lengths
        self.max_positions = max_positions
        self.src_pieces = _pieces(tokenizers.src.path)
        self.tgt_pieces = _pieces(tokenizers.tgt.path)
        self.tgt_ids = {piece: i for i, piece in enumerate(self.tgt_pieces)}

    def close(self) -> None:
        """Nothing to release: CTranslate2's threads end with the translator."""

    def max_length(self, source_length: int, floor: int = 0, decode: DecodeConfig | None = None) -> int:
        """mtkit's output limit (tokens before EOS) for a source of ``source_length`` subwords:
        at least ``floor`` (the prefix length, the minimum length), at most what the model's
        positions allow (as ``mtkit.search.max_lengths``)."""
        d = decode or self.decode
        limit = max(int(math.floor(d.max_len_a * (source_length + 1) + d.max_len_b)), floor)
        return limit if self.max_positions is None else min(limit, self.max_positions - 1)

    def translate_ids(self, batch: list[list[int]]) -> list[list[int]]:
        """Best hypothesis ids (no BOS/EOS) for non-empty source id lists (no BOS/EOS), in order."""
        limits = [self.max_length(len(ids)) for ids in batch]
        groups = [list(range(len(batch)))]
        if self.exact_lengths:
            groups = [[i for i, limit in enumerate(limits) if limit == value] for value in sorted(set(limits))]
        out: list[list[int]] = [[] for _ in batch]
        for rows in groups:
            results = self.translator.translate_batch(
                [[self.src_pieces[i] for i in batch[r]] for r in rows],
                beam_size=self.decode.beam,
                length_penalty=self.decode.lenpen,
                max_decoding_length=max(limits[r] for r in rows),
                min_decoding_length=self.decode.min_len,
                suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
                return_scores=False,
            )
            for r, result in zip(rows, results, strict=True):
                out[r] = [self.tgt_ids[p] for p in result.hypotheses[0]]
        return out

    def search(
        self,
        batches: list[list[list[int]]],
        prefixes: list[list[list[int]]] | None = None,
        decode: DecodeConfig | None = None,
    ) -> list[list[Hypothesis]]:
        """Per sentence of ``batches`` (each a list of non-empty source id lists, no EOS), its
        n-best ``Hypothesis`` list, best first, as ``mtkit.search`` returns them; the sentences
        in order, batch after batch. ``prefixes``: per batch, per sentence, target ids the
        output starts with ([] for none). All batches are submitted at once, so that they run
        concurrently on the translator's ``inter_threads``."""
        d = decode or self.decode
        sources = [ids for batch in batches for ids in batch]
        forced = [ids for batch in prefixes for ids in batch] if prefixes is not None else [[] for _ in sources]
        # A sentence's limit: CTranslate2 takes one per call, so each batch is cut into runs
        # of equal limit (sorted batches hold few distinct lengths).
        groups: dict[tuple[int, int], list[int]] = {}
        start = 0
        for number, batch in enumerate(batches):
            for row in range(start, start + len(batch)):
                limit = self.max_length(len(sources[row]), max(len(forced[row]), d.min_len), d)
                groups.setdefault((number, limit), []).append(row)
            start += len(batch)
        # Prefix tokens count in mtkit's score but not in CTranslate2's: the beam's candidates
        # are the same (every one holds the prefix), but ranking them with the prefix's log-
        # probability added needs them all.
        rescore = any(forced) and d.lenpen != 0 and not d.sampling and d.nbest < d.beam
        options: dict[str, Any] = dict(
            beam_size=1 if d.sampling else d.beam,
            num_hypotheses=d.beam if rescore else d.nbest,
            length_penalty=d.lenpen,
            min_decoding_length=d.min_len,
            suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
            disable_unk=not d.allow_unk,
            return_end_token=True,  # the length that the penalty divides by counts the EOS
            return_scores=True,
            max_input_length=0,  # mtkit.translate already truncated the source
        )
        if d.sampling:
            options.update(sampling_topk=d.top_k, sampling_topp=d.top_p, sampling_temperature=d.temperature)
        pending = []
        for (_, limit), rows in groups.items():
            target_prefix = [[self.tgt_pieces[i] for i in forced[r]] or None for r in rows]
            pending.append((rows, self.translator.translate_batch(
                [[self.src_pieces[i] for i in sources[r]] for r in rows],
                target_prefix=target_prefix if any(target_prefix) else None,
                max_decoding_length=limit, asynchronous=True, **options,
            )))
        found: list[list[tuple[list[str], float]]] = [[] for _ in sources]
        for rows, results in pending:
            for row, pending_result in zip(rows, results, strict=True):
                result = pending_result.result()
                found[row] = list(zip(result.hypotheses, result.scores, strict=True))
        # mtkit's score counts what CTranslate2's leaves out: a prefix's tokens, and the EOS that
        # mtkit forces at the maximum length. Those hypotheses are scored again, whole.
        eos = SPECIAL_PIECES[EOS_ID]
        redo = [(row, k) for row, hyps in enumerate(found) for k, (pieces, _) in enumerate(hyps)
                if forced[row] or not pieces or pieces[-1] != eos]
        rescored = self._logprobs([sources[row] for row, _ in redo],
                                  [found[row][k][0] for row, k in redo]) if redo else []
        exact = dict(zip(redo, rescored, strict=True))
        out: list[list[Hypothesis]] = [[] for _ in sources]
        for row, hyps in enumerate(found):
            mine = []
            for k, (pieces, score) in enumerate(hyps):
                ended = bool(pieces) and pieces[-1] == eos
                tokens = [self.tgt_ids[p] for p in (pieces[:-1] if ended else pieces)]
                logprob = exact.get((row, k), score * len(pieces) ** d.lenpen)
                mine.append(Hypothesis(tokens, logprob / (len(tokens) + 1) ** d.lenpen))
            out[row] = sorted(mine, key=lambda h: -h.score)[: d.nbest]
        return out

    def _logprobs(self, sources: list[list[int]], targets: list[list[str]]) -> list[float]:
        """The log-probability of each target (pieces, an EOS at the end or not) followed by EOS."""
        eos = SPECIAL_PIECES[EOS_ID]
        bare = [t[:-1] if t and t[-1] == eos else t for t in targets]
        scored = self.translator.score_batch([[self.src_pieces[i] for i in ids] for ids in sources], bare)
        return [float(sum(result.log_probs)) for result in scored]  # its last is the EOS's

    def translate(self, lines: list[str], batch_size: int = 32) -> list[str]:
        """The best translation of each line, in input order (empty lines stay empty)."""
        ids = self.tokenizers.src.encode(lines)
        out: list[list[int]] = [[] for _ in ids]
        todo = [i for i, x in enumerate(ids) if x]
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            for row, hyp in zip(rows, self.translate_ids([ids[r] for r in rows]), strict=True):
                out[row] = hyp
        return self.tokenizers.tgt.decode(out)


class CT2Generator(CT2Translator):
    """``CT2Translator`` for a decoder-only model exported as a CTranslate2 ``Generator``: each
    source is the prompt ``source </s> <s>``, and generation continues after it. A batch holds
    sources of one length with ``exact_lengths`` (CTranslate2 forwards a batch's prompts at
    once only up to the shortest), else of any length under the longest one's limit."""

    def __init__(
        self,
        model_dir: Path,
        tokenizers: Any,
        decode: DecodeConfig,
        *,
        compute_type: str = "default",
        intra_threads: int = 0,
        exact_lengths: bool = True,
    ):
        ctranslate2 = require("ctranslate2")
        self.generator = ctranslate2.Generator(
            str(model_dir), device="cpu", compute_type=compute_type, intra_threads=intra_threads, inter_threads=1
        )
        self.tokenizers, self.decode, self.exact_lengths = tokenizers, decode, exact_lengths
        self.max_positions = None  # the prompt shares the positions: CTranslate2 stops at the end
        self.src_pieces = _pieces(tokenizers.src.path)
        self.tgt_ids = {piece: i for i, piece in enumerate(_pieces(tokenizers.tgt.path))}

    def translate_ids(self, batch: list[list[int]]) -> list[list[int]]:
        """Best hypothesis ids (no BOS/EOS) for non-empty source id lists (no BOS/EOS), in order."""
        groups = [list(range(len(batch)))]
        if self.exact_lengths:
            groups = [[i for i, ids in enumerate(batch) if len(ids) == n] for n in sorted({len(ids) for ids in batch})]
        prompt_end = [SPECIAL_PIECES[EOS_ID], SPECIAL_PIECES[BOS_ID]]
        out: list[list[int]] = [[] for _ in batch]
        for rows in groups:
            results = self.generator.generate_batch(
                [[self.src_pieces[i] for i in batch[r]] + prompt_end for r in rows],
                beam_size=self.decode.beam,
                length_penalty=self.decode.lenpen,
                max_length=max(self.max_length(len(batch[r])) for r in rows),
                min_length=self.decode.min_len,
                suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
                include_prompt_in_result=False,
                return_scores=False,
            )
            for r, result in zip(rows, results, strict=True):
                out[r] = [self.tgt_ids[p] for p in result.sequences[0]]
        return out


@dataclass
class Parity:
    """How often mtkit and CTranslate2 produce the same translation of the same lines."""

    sentences: int
    greedy_identical: float
    beam: int
    beam_identical: float
    differences: list[tuple[str, str, str]] = field(default_factory=list)
    """Up to three ``(source, mtkit, ctranslate2)`` beam-search examples that differ."""


def ct2_parity(loaded: Loaded, model_dir: Path, lines: list[str], compute_type: str = "default") -> Parity:
    """Translate ``lines`` with mtkit and with the CTranslate2 model in ``model_dir``, both
    greedily and with the run's beam settings, and count identical outputs."""
    from mtkit.translate import Translator

    decode = loaded.config.decode.model_copy(update={"sampling": False, "nbest": 1})
    greedy = decode.model_copy(update={"beam": 1})
    shares, outputs = {}, {}
    for name, settings in (("greedy", greedy), ("beam", decode)):
        ours = Translator(loaded.model, loaded.tokenizers, settings).translate(lines)
        runtime = CT2Generator if isinstance(loaded.model, DecoderOnly) else CT2Translator
        theirs = runtime(model_dir, loaded.tokenizers, settings, compute_type=compute_type).translate(lines)
        shares[name] = sum(a == b for a, b in zip(ours, theirs, strict=True)) / max(len(lines), 1)
        outputs[name] = (ours, theirs)
    ours, theirs = outputs["beam"]
    differences = [(s, a, b) for s, a, b in zip(lines, ours, theirs, strict=True) if a != b][:3]
    return Parity(len(lines), shares["greedy"], decode.beam, shares["beam"], differences)


SAMPLE_SENTENCES = [
    "A man in an orange hat starring at something.",
    "Two young children are playing in the sand on a beach.",
    "A group of people stand in front of an igloo.",
    "A woman is riding a bicycle down a busy city street.",
    "A black dog runs through the grass with a ball in its mouth.",
    "Several men in hard hats are operating a giant pulley system.",
    "A little girl climbs into a wooden playhouse.",
    "People are walking along the beach at sunset.",
]
"""Default parity sample: short descriptive English (Multi30k-like) sentences."""
