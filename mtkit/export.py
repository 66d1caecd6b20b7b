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

Weight names map one-to-one (``mtkit.models`` follow Marian's names); only the fused
projections are split (Marian) or kept fused (CTranslate2 fuses them the same way):

    self_attn.qkv_proj  (3D, D)  = q, k, v stacked   -> Marian q_proj, k_proj, v_proj
    encoder_attn.kv_proj (2D, D) = k, v stacked      -> Marian k_proj, v_proj

Token ids are fixed by ``mtkit.vocab``: PAD 0 ``<pad>``, UNK 1 ``<unk>``, BOS 2 ``<s>``
(the decoder's start token), EOS 3 ``</s>``.

Converters only: running a converted CTranslate2 model, and the conversion cache that
``mtkit translate`` keeps, are ``mtkit.engines.ctranslate2``'s.

``transformers`` is optional (``pip install 'mtkit[bench]'``); ``ctranslate2`` is a dependency
of mtkit that may still be missing (mtkit then translates with PyTorch). Both are imported only
when used.
"""

from __future__ import annotations

import importlib
import json
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mtkit.checkpoint import Loaded, load_for_inference
from mtkit.config import DecodeConfig, ModelConfig
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, atomic_write_text, refuse_overlap
from mtkit.models.decoder_only import DecoderOnly
from mtkit.models.encoder_decoder import DecoderLayer, Transformer
from mtkit.models.layers import Block
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


def _special_problems(loaded: Loaded) -> list[str]:
    problems = []
    for side in ("src", "tgt"):
        pieces = getattr(loaded.tokenizers, side).vocabulary()
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
                             loaded.tokenizers.shared_vocab).eval()
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
        src_vocab = {piece: i for i, piece in enumerate(tokenizers.src.vocabulary())}
        tgt_vocab = {piece: i for i, piece in enumerate(tokenizers.tgt.vocabulary())}
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
    ``mtkit.models.Transformer(cfg, src_vocab_size, tgt_vocab_size, joint_vocab)``: same layers,
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

    def ffn_and_norms(prefix: str, layer: Block | DecoderLayer, norms: list[str]) -> None:
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


def _encoder_layers(model: Transformer) -> list[Block]:
    """The encoder's layers with their type (an ``nn.ModuleList`` yields plain modules)."""
    return [cast(Block, layer) for layer in model.encoder_layers]


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
        if not loaded.model.has_encoder:
            problems += _generator_problems(loaded.config.model, cast(DecoderOnly, loaded.model))
        return problems + _special_problems(loaded)

    def write(self, loaded: Loaded, directory: Path) -> None:
        model = loaded.model
        if model.has_encoder:
            spec = ctranslate2_spec(loaded)
        else:
            spec = ctranslate2_generator_spec(loaded, cast(DecoderOnly, model))
        spec.validate()
        spec.optimize(quantization=self.quantization)
        spec.save(str(directory))
        shutil.copyfile(loaded.tokenizers.src.path, directory / "source.spm")
        shutil.copyfile(loaded.tokenizers.tgt.path, directory / "target.spm")


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
    spec.register_source_vocabulary(loaded.tokenizers.src.vocabulary())
    spec.register_target_vocabulary(loaded.tokenizers.tgt.vocabulary())
    return spec


def _generator_problems(cfg: ModelConfig, model: DecoderOnly) -> list[str]:
    """What a CTranslate2 ``Generator`` cannot represent of a decoder-only model."""
    problems = []
    if cfg.source_attention != "causal":
        problems.append(f"model.source_attention={cfg.source_attention}: CTranslate2 runs decoder-only models "
                        "with causal attention only; train with `model.source_attention: causal`")
    if not cfg.target_follows_source:
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
    spec.register_vocabulary(loaded.tokenizers.tgt.vocabulary())
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


def _ct2_ffn(spec: Any, layer: Block | DecoderLayer) -> None:
    _ct2_linear(spec.linear_0, layer.ffn.fc1)
    _ct2_linear(spec.linear_1, layer.ffn.fc2)
    _ct2_norm(spec.layer_norm, layer.final_layer_norm)


