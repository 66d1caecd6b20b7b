"""Export a trained model to other runtimes: Hugging Face transformers and CTranslate2.

An encoder-decoder exports to the transformers class that computes what it computes
(``HF_CLASSES``, by ``model.norm`` and ``model.embedding_norm``): MarianMTModel (post-norm),
BART (post-norm, embedding norm), Blenderbot (pre-norm), mBART (pre-norm, embedding norm).

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
projections are split (transformers) or kept fused (CTranslate2 fuses them the same way):

    self_attn.qkv_proj  (3D, D)  = q, k, v stacked   -> q_proj, k_proj, v_proj
    encoder_attn.kv_proj (2D, D) = k, v stacked      -> k_proj, v_proj

Token ids are fixed by ``mtkit.vocab``: PAD 0 ``<pad>``, UNK 1 ``<unk>``, BOS 2 ``<s>``
(the decoder's start token), EOS 3 ``</s>``.

Converters only: running a converted CTranslate2 model, and the conversion cache that
``mtkit translate`` keeps, are ``mtkit.engines.ctranslate2``'s.

``transformers`` is optional (``pip install 'mtkit[hf]'``); ``ctranslate2`` is a dependency
of mtkit that may still be missing (mtkit then translates with PyTorch). Both are imported only
when used.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtkit.checkpoint import Loaded, load_for_inference
from mtkit.config import DecodeConfig, ModelConfig
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, atomic_write_text, refuse_overlap
from mtkit.huggingface import MASKED_LOGIT
from mtkit.models.decoder_only import DecoderOnly
from mtkit.models.encoder_decoder import DecoderLayer, Transformer
from mtkit.models.layers import GATED, Attention, Block, Norm, Positions, RelativeBias
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

if TYPE_CHECKING:
    from mtkit.engines.ctranslate2 import Parity

SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


def require(module: str) -> ModuleType:
    """Import an optional runtime, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        how = "pip install ctranslate2" if package == "ctranslate2" else "pip install 'mtkit[hf]'"
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


# --------------------------------------------------------------------------- Hugging Face


@dataclass(frozen=True)
class HFClass:
    """A transformers class that computes exactly what an mtkit ``Transformer`` computes, for one
    ``(model.norm, model.embedding_norm)`` pair. All are of the BART lineage, whose layers bear
    mtkit's names; they differ where mtkit's options do."""

    model_type: str
    """transformers' ``config.model_type`` (what ``mtkit import huggingface`` keys on)."""
    model_class: str
    config_class: str
    position_offset: int = 0
    """Rows of the position table before position 0 (BART's and mBART's 2)."""
    fixed_positions: bool = False
    """Positions are Marian's sinusoidal table, recomputed on loading and never saved; the other
    classes keep a learned table, into which any of mtkit's tables is written."""
    two_vocabularies: bool = False
    """The encoder and the decoder may have vocabularies of different sizes (Marian's
    ``decoder_vocab_size``); the others have one size, and a smaller side is padded."""


HF_CLASSES: dict[tuple[str, bool], HFClass] = {
    # post-norm: the layers' own norms end each stack
    ("post", False): HFClass("marian", "MarianMTModel", "MarianConfig", fixed_positions=True, two_vocabularies=True),
    ("post", True): HFClass("bart", "BartForConditionalGeneration", "BartConfig", position_offset=2),
    # pre-norm: a final layer norm ends each stack
    ("pre", False): HFClass("blenderbot", "BlenderbotForConditionalGeneration", "BlenderbotConfig"),
    ("pre", True): HFClass("mbart", "MBartForConditionalGeneration", "MBartConfig", position_offset=2),
}
"""The class each mtkit encoder-decoder exports as, by ``(model.norm, model.embedding_norm)``.
Every class scales embeddings or not (``scale_embedding``), takes mtkit's activations, ties or
unties its embeddings and has an output bias (``final_logits_bias``)."""


def modern_blocks(cfg: ModelConfig) -> list[str]:
    """The block options of ``cfg`` beyond the 2017 Transformer's, as ``model.key=value``: RMSNorm,
    no biases, grouped-query attention, rotary or relative positions, a gated feed-forward, T5's
    head width, unscaled attention and output scale."""
    found = []
    if cfg.norm_type != "layer":
        found.append(f"model.norm_type={cfg.norm_type}")
    if not cfg.bias:
        found.append("model.bias=false")
    if cfg.key_value_heads != cfg.heads:
        found.append(f"model.kv_heads={cfg.kv_heads}")
    if cfg.positions in ("rope", "relative"):
        found.append(f"model.positions={cfg.positions}")
    if cfg.activation in GATED:
        found.append(f"model.activation={cfg.activation}")
    if cfg.head_dim is not None and cfg.head_dim * cfg.heads != cfg.d_model:
        found.append(f"model.head_dim={cfg.head_dim}")
    if not cfg.scale_attention:
        found.append("model.scale_attention=false")
    if cfg.scale_output:
        found.append("model.scale_output=true")
    return found


def huggingface_class(cfg: ModelConfig) -> HFClass:
    """The transformers class an encoder-decoder with ``cfg`` exports as."""
    return HF_CLASSES[(cfg.norm, cfg.embedding_norm)]


class HuggingFaceExporter(Exporter):
    """A transformers model directory: config.json, model.safetensors, generation_config.json
    (mtkit's decode settings), a ``MarianTokenizer`` (source.spm, target.spm, vocab.json; any
    class takes it through tokenizer_config.json) and ``custom_generate/generate.py`` (mtkit's
    per-sentence length limit, run with ``trust_remote_code=True``). The class follows the
    model's options (``HF_CLASSES``)."""

    name = "huggingface"

    def problems(self, loaded: Loaded) -> list[str]:
        cfg = loaded.config.model
        if cfg.arch != "encoder_decoder":
            return [f"model.arch={cfg.arch}: Marian is an encoder-decoder, as are BART, mBART and Blenderbot; "
                    "export a causal decoder-only model to ctranslate2 instead"]
        problems = []
        target = huggingface_class(cfg)
        modern = modern_blocks(cfg)
        if modern:
            return [f"{', '.join(modern)}: the Marian, BART, mBART and Blenderbot classes have LayerNorm with "
                    "biases, multi-head attention, added positions and plain feed-forward blocks; export to "
                    "ctranslate2 instead"]
        if target.fixed_positions and cfg.positions != "sinusoidal":
            problems.append(
                f"model.positions={cfg.positions}: a post-norm model without model.embedding_norm exports as "
                f"{target.model_class}, whose positions are Marian's fixed sinusoids; train with "
                "`model.positions: sinusoidal` (or `model.embedding_norm: true`, which exports as BART)"
            )
        elif target.fixed_positions and loaded.model.src_embed.embedding_dim % 2:
            problems.append(f"model.d_model={cfg.d_model}: Marian's sinusoidal table differs for odd widths")
        for side in ("src", "tgt"):
            path = getattr(loaded.tokenizers, side).path
            if path.suffix == ".json":
                problems.append(f"tokenizer ({side}): {path.name} is a Hugging Face tokenizer.json; the export "
                                "writes a MarianTokenizer, which needs SentencePiece models")
        return problems + _special_problems(loaded)

    def notes(self, loaded: Loaded) -> list[str]:
        """What generation_config.json cannot carry of the run's decode settings, one line each."""
        notes = []
        decode = loaded.config.decode
        if decode.length_penalty_form == "gnmt" and decode.beam > 1 and decode.lenpen:
            notes.append("decode.length_penalty_form=gnmt: transformers divides by length ** lenpen "
                         "(mtkit's `length` form); beam outputs may differ")
        languages = loaded.tokenizers.languages
        if languages is not None and languages.source == "src":
            notes.append("the source's language token is not added by the MarianTokenizer: start each source "
                         "with it (e.g. `__en__ text`)")
        return notes

    def write(self, loaded: Loaded, directory: Path) -> None:
        transformers = require("transformers")
        transformers.utils.logging.disable_progress_bar()
        ours = cast(Transformer, loaded.model)  # problems() refuses the other architectures
        target = huggingface_class(loaded.config.model)
        model = huggingface_model(loaded.config.model, ours).eval()
        weights = huggingface_state_dict(ours, target, model.config.vocab_size)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as err:  # a mapping bug, not a user mistake: keep the detail
            raise RuntimeError(f"mtkit -> {target.model_class} weight mapping does not fit: {err}") from err
        if target.fixed_positions:
            _check_marian_positions(model, ours)
        model.generation_config = huggingface_generation_config(loaded)
        model.save_pretrained(directory)
        self._write_tokenizer(loaded, directory)
        (directory / "custom_generate").mkdir()
        shutil.copyfile(Path(__file__).with_name("hf_generate.py"), directory / "custom_generate" / "generate.py")

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
        tokenizer_config: dict[str, Any] = {
            "tokenizer_class": "MarianTokenizer",
            "source_lang": data.src_lang,
            "target_lang": data.tgt_lang,
            "separate_vocabs": separate,
            "unk_token": SPECIAL_PIECES[UNK_ID],
            "eos_token": SPECIAL_PIECES[EOS_ID],
            "pad_token": SPECIAL_PIECES[PAD_ID],
            "bos_token": SPECIAL_PIECES[BOS_ID],  # the decoder's start: dropped from decoded text
            "model_max_length": loaded.config.model.max_positions,
        }
        if tokenizers.languages is not None:
            # Special, a language token is one token in the text and never in decoded text (mtkit
            # hides it too).
            tokenizer_config["additional_special_tokens"] = sorted(tokenizers.languages.tokens.values())
        if separate:
            tokenizer_config["target_vocab_file"] = "target_vocab.json"
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")


def huggingface_config(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, shared: bool, tied: bool) -> Any:
    """The transformers config of ``huggingface_class(cfg)`` for an mtkit ``Transformer`` with
    ``cfg`` and these vocabularies: ``shared``, one embedding table for both sides; ``tied``, the
    target embedding is the output projection. Same layers, widths, heads, activation, dropouts,
    embedding scale, mtkit's special token ids."""
    transformers = require("transformers")
    target = huggingface_class(cfg)
    sizes: dict[str, Any] = {"vocab_size": max(src_vocab_size, tgt_vocab_size)}
    if target.two_vocabularies:
        sizes = {"vocab_size": src_vocab_size, "decoder_vocab_size": tgt_vocab_size,
                 "share_encoder_decoder_embeddings": shared}
        tie = tied
    else:
        # transformers ties all three tables or none: untied, each is written apart.
        tie = shared and tied
    extra = {"encoder_no_repeat_ngram_size": 0} if target.model_type == "blenderbot" else {}
    return getattr(transformers, target.config_class)(
        **sizes,
        **extra,
        tie_word_embeddings=tie,
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
        scale_embedding=cfg.scale_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,  # the generation config's business
    )


def marian_config(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Any:
    """The ``MarianConfig`` of ``mtkit.models.Transformer(cfg, src_vocab_size, tgt_vocab_size,
    joint_vocab)`` read as post-norm with Marian's positions, whatever ``cfg.norm`` says (the
    peer the benchmarks train)."""
    # Embeddings are shared under the rule Transformer applies; an export whose model decided
    # otherwise fails its strict weight loading.
    shared = cfg.share_embeddings and joint_vocab and src_vocab_size == tgt_vocab_size
    marian = cfg.model_copy(update={"norm": "post", "embedding_norm": False})
    return huggingface_config(marian, src_vocab_size, tgt_vocab_size, shared, cfg.tie_output)


def marian_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Any:
    """A randomly initialised ``MarianMTModel`` of ``marian_config(...)`` (the peer that the
    benchmarks train)."""
    transformers = require("transformers")
    return transformers.MarianMTModel(marian_config(cfg, src_vocab_size, tgt_vocab_size, joint_vocab))


def huggingface_model(cfg: ModelConfig, model: Transformer) -> Any:
    """A randomly initialised model of ``huggingface_class(cfg)`` shaped like ``model``: the
    container the export loads ``model``'s weights into."""
    transformers = require("transformers")
    shared = model.src_embed is model.tgt_embed
    tied = model.output_proj.weight is model.tgt_embed.weight
    config = huggingface_config(cfg, model.src_embed.num_embeddings, model.tgt_embed.num_embeddings, shared, tied)
    return getattr(transformers, huggingface_class(cfg).model_class)(config)


def huggingface_generation_config(loaded: Loaded, decode: DecodeConfig | None = None) -> Any:
    """mtkit's decode settings as transformers' ``GenerationConfig``: beam size, length-penalty
    alpha (transformers divides by ``length ** alpha``, mtkit's ``length`` form), mtkit's rule for
    when a beam search is done, minimum length,
    sampling, start/end/padding tokens, PAD and BOS (and UNK unless ``decode.allow_unk``) never
    generated, a multilingual model's target language token forced first.

    Length: ``max_len_a`` and ``max_len_b`` are kept for ``custom_generate/generate.py``, which
    limits each sentence as mtkit does. Plain ``generate`` has one ``max_length`` for every
    sentence: mtkit's limit for the longest source that training kept (``data.max_len``), EOS
    forced there."""
    transformers = require("transformers")
    decode = decode or loaded.config.decode
    cfg = loaded.config
    longest = min(cfg.model.max_positions - 1,
                  math.floor(decode.max_len_a * (cfg.data.max_len + 1) + decode.max_len_b))
    suppressed = [[PAD_ID], [BOS_ID]] + ([] if decode.allow_unk else [[UNK_ID]])
    settings: dict[str, Any]
    if decode.sampling:
        settings = {"do_sample": True, "num_beams": 1, "temperature": decode.temperature,
                    "top_k": decode.top_k, "top_p": decode.top_p}
    else:
        # mtkit's rule (mtkit.search): done once ``beam`` hypotheses finished under the length
        # form, else once no live beam can beat a finished one at the longest length ("never").
        counts = decode.length_penalty_form == "length" and decode.lenpen != 0
        settings = {"do_sample": False, "num_beams": decode.beam, "length_penalty": decode.lenpen,
                    "early_stopping": True if counts else "never"}
    languages = loaded.tokenizers.languages
    if languages is not None and languages.target == "tgt" and cfg.data.tgt_lang in languages.tokens:
        # The run's target language (the generate caller may force another).
        settings["forced_bos_token_id"] = loaded.tokenizers.tgt.piece_to_id(languages.tokens[cfg.data.tgt_lang])
    return transformers.GenerationConfig(
        **settings,
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        forced_eos_token_id=EOS_ID,
        bad_words_ids=suppressed,
        max_length=longest + 2,  # the decoder start token, the output, its EOS
        min_new_tokens=decode.min_len or None,
        max_len_a=decode.max_len_a,
        max_len_b=decode.max_len_b,
    )


def huggingface_state_dict(model: Transformer, target: HFClass, vocab_size: int | None = None) -> dict[str, Tensor]:
    """mtkit ``Transformer`` weights under the names of ``target`` (fused projections split).
    Every key of the target's ``state_dict()`` is present, so loading can be strict.
    ``vocab_size``: the target's one vocabulary size (not Marian's), to which a smaller side's
    embeddings are padded with zero rows; padded output columns get a bias of ``MASKED_LOGIT``,
    so that they take no probability."""
    out: dict[str, Tensor] = {}
    d_model = model.src_embed.embedding_dim
    src: Tensor = model.src_embed.weight
    tgt: Tensor = model.tgt_embed.weight
    proj: Tensor = model.output_proj.weight
    bias: Tensor = model.output_proj.bias if model.output_proj.bias is not None else torch.zeros(proj.shape[0])
    if not target.two_vocabularies:
        size = vocab_size or max(src.shape[0], tgt.shape[0])
        src, tgt, proj = (_pad_rows(t, size) for t in (src, tgt, proj))
        bias = torch.cat([bias.detach(), torch.full((size - bias.shape[0],), MASKED_LOGIT)])
    out["model.shared.weight"] = src
    out["model.encoder.embed_tokens.weight"] = src
    out["model.decoder.embed_tokens.weight"] = tgt
    out["lm_head.weight"] = proj
    out["final_logits_bias"] = bias.reshape(1, -1)
    if target.two_vocabularies and model.src_embed is not model.tgt_embed:
        del out["model.shared.weight"]  # Marian keeps it only when both sides share it
    decoder_positions = model.decoder_positions or model.positions
    for side, positions in (("encoder", model.positions), ("decoder", decoder_positions)):
        out[f"model.{side}.embed_positions.weight"] = F.pad(positions.weight, (0, 0, target.position_offset, 0))

    def linear(name: str, module: nn.Linear | nn.LayerNorm) -> None:
        out[f"{name}.weight"] = module.weight
        out[f"{name}.bias"] = module.bias

    for side in ("encoder", "decoder"):
        if model.cfg.norm == "pre":  # a pre-norm stack ends with a layer norm
            linear(f"model.{side}.layer_norm", getattr(model, f"{side}_layer_norm"))
        if model.cfg.embedding_norm:
            linear(f"model.{side}.layernorm_embedding", getattr(model, f"{side}_embedding_norm"))

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


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """mtkit ``Transformer`` weights under ``MarianMTModel`` names (a post-norm model without
    embedding norm)."""
    return huggingface_state_dict(model, HF_CLASSES[("post", False)])


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` ``(n, D)`` with zero rows appended up to ``rows``."""
    return F.pad(tensor.detach(), (0, 0, 0, rows - tensor.shape[0]))


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


def hf_parity(loaded: Loaded, model_dir: Path, lines: list[str], src_lang: str | None = None,
              tgt_lang: str | None = None) -> Parity:
    """Translate ``lines`` with mtkit and with the transformers export in ``model_dir`` (its
    tokenizer, its generation config, ``custom_generate/generate.py``'s length limits), greedily
    and with the run's beam settings, and count identical outputs."""
    transformers = require("transformers")
    from mtkit.engines.ctranslate2 import Parity
    from mtkit.hf_generate import generate
    from mtkit.tokenizer import language_prefixes, run_languages
    from mtkit.translate import Translator

    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    decode = loaded.config.decode.model_copy(update={"sampling": False, "nbest": 1})
    source, target = language_prefixes(loaded.tokenizers,
                                       *run_languages(loaded.config.data, loaded.tokenizers, src_lang, tgt_lang))
    # The source's language token as a user writes it (the tokenizer knows it as one token).
    prefix = "".join(f"{loaded.tokenizers.src.vocabulary()[i]} " for i in source)
    inputs = tokenizer([prefix + line for line in lines], return_tensors="pt", padding=True)
    shares, outputs = {}, {}
    for name, beam in (("greedy", 1), ("beam", decode.beam)):
        settings = decode.model_copy(update={"beam": beam})
        ours = Translator(loaded.model, loaded.tokenizers, settings, src_lang=src_lang, tgt_lang=tgt_lang
                          ).translate(lines)
        config = copy.deepcopy(model.generation_config)
        config.num_beams = beam
        if target:
            config.forced_bos_token_id = target[0]
        with torch.inference_mode():
            generated = generate(model=model, **inputs, generation_config=config)
        theirs = tokenizer.batch_decode(generated, skip_special_tokens=True)
        # MarianTokenizer strips the ends of a text; mtkit keeps what the pieces say.
        shares[name] = sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True)) / max(len(lines), 1)
        outputs[name] = (ours, theirs)
    ours, theirs = outputs["beam"]
    differences = [(s, a, b) for s, a, b in zip(lines, ours, theirs, strict=True) if a.strip() != b.strip()][:3]
    return Parity(len(lines), shares["greedy"], decode.beam, shares["beam"], differences)


# --------------------------------------------------------------------------- CTranslate2


class CTranslate2Exporter(Exporter):
    """A CTranslate2 model directory: model.bin, config.json, the vocabularies and the
    SentencePiece model(s) (source.spm, target.spm). Every ``model`` option is representable
    (but a decoder-only model's attention and positions: ``_generator_problems``): pre- and
    post-norm, the activations, any position table (written whole, one per stack), unscaled
    embeddings, the embedding norm, the output bias, and the block options (``_ct2_blocks``):
    RMSNorm, no biases, grouped-query attention, rotary (half-split) and relative (T5 buckets,
    scaled logits) positions, gated feed-forwards."""

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


_CT2_ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "silu": "SWISH", "swiglu": "SWISH", "geglu": "GELUTanh"}
"""``model.activation`` -> ``ctranslate2.specs.common_spec.Activation`` (GELU is the erf one, as mtkit's;
geglu's is the tanh approximation, as mtkit's)."""


def _ct2_activation(cfg: ModelConfig) -> Any:
    from ctranslate2.specs import common_spec

    return getattr(common_spec.Activation, _CT2_ACTIVATIONS[cfg.activation])


def _ct2_blocks(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of CTranslate2's ``TransformerEncoderSpec`` and
    ``TransformerDecoderSpec`` for ``cfg``'s block options: RMSNorm; a gated feed-forward
    (``linear_0`` the activated gate, ``linear_0_noact`` mtkit's ``fc1``); grouped-query
    attention (CTranslate2 splits a fused projection as mtkit does: the query's D rows, then the
    keys' and the values' ``kv_heads * D/H``, each key/value head serving ``heads / kv_heads``
    consecutive query heads; cross-attention's ``kv_proj`` keys then values, ``kv_heads`` heads
    each, as mtkit's); rotary positions over the whole head, half-split (not
    interleaved); T5's relative attention bias, whose logits CTranslate2 scales by
    ``head_dim ** -0.5`` unless told otherwise (``queries_scale``, which T5's converter sets to
    1 and this one leaves alone where mtkit scales; ``_ct2_attention_scale``). No biases need
    nothing here: a linear bias is optional, and a LayerNorm without one gets a zero one
    (``_ct2_norm``)."""
    kwargs: dict[str, Any] = {"rms_norm": cfg.norm_type == "rms", "ffn_glu": cfg.activation in GATED}
    if cfg.head_dim is not None:
        kwargs["head_dim"] = cfg.head_dim
    if cfg.key_value_heads != cfg.heads:
        kwargs["num_heads_kv"] = cfg.key_value_heads
    if cfg.positions == "rope":
        kwargs.update(rotary_dim=0, rotary_interleave=False, rotary_base=cfg.rope_base)
    if cfg.positions == "relative":
        kwargs["relative_attention_bias"] = True
    return kwargs


def ctranslate2_spec(loaded: Loaded) -> Any:
    """A ``ctranslate2.specs.TransformerSpec`` holding ``loaded.model``'s weights and vocabularies."""
    require("ctranslate2")
    from ctranslate2.specs import transformer_spec

    cfg, model = loaded.config.model, cast(Transformer, loaded.model)
    common = {"pre_norm": cfg.norm == "pre", "activation": _ct2_activation(cfg),
              "layernorm_embedding": cfg.embedding_norm, **_ct2_blocks(cfg)}
    encoder = transformer_spec.TransformerEncoderSpec(cfg.encoder_layers, cfg.heads, **common)
    decoder = transformer_spec.TransformerDecoderSpec(cfg.decoder_layers, cfg.heads, **common)
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    _ct2_inputs(encoder, encoder.embeddings[0], cfg, model.src_embed, model.positions, model.encoder_embedding_norm)
    _ct2_inputs(decoder, decoder.embeddings, cfg, model.tgt_embed, model.decoder_positions or model.positions,
                model.decoder_embedding_norm)
    for layer_spec, layer in zip(encoder.layer, _encoder_layers(model), strict=True):
        _ct2_self_attention(layer_spec.self_attention, layer.self_attn, layer.self_attn_layer_norm,
                            model.encoder_relative)
        _ct2_ffn(layer_spec.ffn, layer)
    for layer_spec, dec_layer in zip(decoder.layer, _decoder_layers(model), strict=True):
        _ct2_self_attention(layer_spec.self_attention, dec_layer.self_attn, dec_layer.self_attn_layer_norm,
                            model.decoder_relative)
        cross = dec_layer.encoder_attn
        _ct2_linear(layer_spec.attention.linear[0], cross.q_proj)
        _ct2_linear(layer_spec.attention.linear[1], cross.kv_proj)
        _ct2_linear(layer_spec.attention.linear[2], cross.out_proj)
        _ct2_norm(layer_spec.attention.layer_norm, dec_layer.encoder_attn_layer_norm)
        _ct2_ffn(layer_spec.ffn, dec_layer)
    if cfg.norm == "pre":  # pre-norm stacks end with a norm (post-norm: an Identity)
        _ct2_norm(encoder.layer_norm, cast(Norm, model.encoder_layer_norm))
        _ct2_norm(decoder.layer_norm, cast(Norm, model.decoder_layer_norm))
    _ct2_scales(cfg, decoder, [*encoder.layer, *decoder.layer])
    # With its bias (model.output_bias), which also keeps an imported model's masked column masked.
    _ct2_linear(decoder.projection, model.output_proj)

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
    from ctranslate2.specs import transformer_spec

    cfg = loaded.config.model
    spec = transformer_spec.TransformerDecoderModelSpec(transformer_spec.TransformerDecoderSpec(
        cfg.decoder_layers,
        cfg.heads,
        pre_norm=cfg.norm == "pre",
        activation=_ct2_activation(cfg),
        layernorm_embedding=cfg.embedding_norm,
        with_encoder_attention=False,
        **_ct2_blocks(cfg),
    ))
    decoder = spec.decoder
    _ct2_inputs(decoder, decoder.embeddings, cfg, model.tgt_embed, model.positions, model.embedding_norm)
    for layer_spec, layer in zip(decoder.layer, model.layers, strict=True):
        block = cast(Block, layer)
        _ct2_self_attention(layer_spec.self_attention, block.self_attn, block.self_attn_layer_norm, model.relative)
        _ct2_ffn(layer_spec.ffn, block)
    if cfg.norm == "pre":
        _ct2_norm(decoder.layer_norm, cast(Norm, model.layer_norm))
    _ct2_scales(cfg, decoder, list(decoder.layer))
    _ct2_linear(decoder.projection, model.output_proj)
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


def _ct2_inputs(stack: Any, embeddings: Any, cfg: ModelConfig, table: nn.Embedding, positions: Positions,
                norm: Norm | None) -> None:
    """A stack's input as mtkit computes it and CTranslate2 too: token embeddings, times
    sqrt(d_model) where ``model.scale_embeddings``, plus the stack's position table (written
    whole, so any of mtkit's tables, shared or not), then the embedding norm if there is one."""
    embeddings.weight = _numpy(table.weight)
    stack.scale_embeddings = cfg.scale_embeddings
    if positions.added:
        stack.position_encodings.encodings = _numpy(positions.weight)
    elif hasattr(stack, "position_encodings"):
        # Rotary positions act inside attention: CTranslate2's encoder spec still offers an
        # (optional) table, which such an encoder never reads.
        del stack.position_encodings
    if norm is not None:
        _ct2_norm(stack.layernorm_embedding, norm)


def _ct2_linear(spec: Any, module: nn.Linear) -> None:
    spec.weight = _numpy(module.weight)
    if module.bias is not None:
        spec.bias = _numpy(module.bias)


def _ct2_norm(spec: Any, norm: Norm) -> None:
    """A LayerNorm (its bias, or zeros where ``model.bias`` is off: CTranslate2's LayerNorm has
    one) or an RMSNorm (a gain only)."""
    spec.gamma = _numpy(norm.weight)
    if isinstance(norm, nn.LayerNorm):
        spec.beta = _numpy(norm.bias) if norm.bias is not None else _numpy(torch.zeros_like(norm.weight))


def _ct2_self_attention(spec: Any, attention: Attention, norm: Norm, relative: RelativeBias | None) -> None:
    """A self-attention: the fused projection as it is (``_ct2_blocks``), and the stack's one
    relative bias table ``(buckets, heads)`` in every layer, as T5's converter writes it
    (CTranslate2 computes the bias once per stack, from the first layer's)."""
    _ct2_linear(spec.linear[0], attention.qkv_proj)
    _ct2_linear(spec.linear[1], attention.out_proj)
    _ct2_norm(spec.layer_norm, norm)
    if relative is not None:
        import numpy as np

        spec.relative_attention_bias = _numpy(relative.embed.weight)
        spec.relative_attention_max_distance = np.int32(relative.max_distance)


def _ct2_scales(cfg: ModelConfig, decoder: Any, layers: list[Any]) -> None:
    """``model.scale_attention: false``: every attention's logits unscaled (CTranslate2's
    ``queries_scale`` 1, as its T5 converter writes); ``model.scale_output``: the decoder's
    output times d_model^-0.5 (``scale_outputs``)."""
    import numpy as np

    if not cfg.scale_attention:
        for layer in layers:
            for name in ("self_attention", "attention"):
                attention = getattr(layer, name, None)
                if attention is not None:
                    attention.queries_scale = np.float32(1.0)
    if cfg.scale_output:
        decoder.scale_outputs = np.float32(cfg.d_model**-0.5)


def _ct2_ffn(spec: Any, layer: Block | DecoderLayer) -> None:
    """The feed-forward; gated, CTranslate2 activates ``linear_0`` (mtkit's ``gate``) and
    multiplies by ``linear_0_noact`` (mtkit's ``fc1``)."""
    ffn = layer.ffn
    if ffn.gate is not None:
        _ct2_linear(spec.linear_0, ffn.gate)
        _ct2_linear(spec.linear_0_noact, ffn.fc1)
    else:
        _ct2_linear(spec.linear_0, ffn.fc1)
    _ct2_linear(spec.linear_1, ffn.fc2)
    _ct2_norm(spec.layer_norm, layer.final_layer_norm)


