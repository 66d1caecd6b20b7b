"""Hugging Face translation models in: ``mtkit import huggingface SRC -o RUN``.

SRC is a ``save_pretrained`` directory or a hub id (downloaded by huggingface_hub). RUN becomes
an ordinary mtkit run: a checkpoint (``RUN/checkpoints/step_00000000``, linked as ``last``,
``best`` and ``final``) whose config describes the model exactly, whose tokenizer segments text
as the model's own tokenizer does, and whose meta.json names the source and its revision.
Every mtkit command then takes it: translate (both backends), serve, compare, average, export,
and fine-tuning (``pretrained.run``, ``mtkit train --init-from``).

The families (``FAMILIES``, keyed by transformers' ``model_type``) are the BART lineage and T5,
whose layers map one-to-one onto mtkit's (fused query/key/value aside); a ``Layout`` reads each
lineage's config and weights:

    family      norm        positions                    embeddings        languages
    marian      post        sinusoidal (Marian's)        scaled            ``>>xxx<<`` first in the source
    m2m_100     pre         sinusoidal_fairseq           scaled            source code first, target code forced
    mbart       pre         learned, offset 2, one each  + layer norm      (mBART-50) as m2m_100
    t5, mt5     pre, RMS    relative (T5's buckets)      unscaled          none (a task prefix is the user's text)

Vocabulary. mtkit fixes PAD, UNK, BOS, EOS at ids 0-3 (``mtkit.vocab``); a Hugging Face model
has its own ids and may use one token in two roles (Marian starts decoding with ``<pad>``,
M2M100 and mBART with ``</s>``). Import permutes the embedding rows and output columns into
mtkit's order, giving mtkit's BOS the row of the model's decoder start token; where that row
already serves another special id, the duplicate output column is masked with a bias of
``MASKED_LOGIT``, so that the softmax covers exactly the model's own columns. The tokenizer
keeps the model's segmentation file(s) (``source.spm``/``target.spm``, ``sentencepiece.bpe.model``
or ``tokenizer.json``) and a vocabulary file of pieces in mtkit's id order (``Tokenizer``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtkit.config import Config, ModelConfig, validate_config
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, atomic_write_text
from mtkit.tokenizer import META_FILE, META_FORMAT, Languages, Tokenizers, check_prompt, files_fingerprint
from mtkit.vocab import BOS_ID, EOS_ID, MASKED_LOGIT, PAD_ID, UNK_ID

VOCAB_FILE = "vocab.json"


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """What differs between the imported families (the layers do not)."""

    model_type: str
    """transformers' ``config.model_type``."""
    tokenizer_files: Callable[[Path], tuple[Path, Path]]
    """The segmentation model of the source and of the target in a model directory."""
    languages: Callable[[Any], Languages | None]
    """The language tokens, from the model's transformers tokenizer."""
    model: Callable[[Any], dict[str, Any]]
    """The ``model`` config keys particular to the family, from the transformers config."""
    position_offset: int = 0
    """Rows of a learned position table before position 0 (mBART's 2)."""
    layout: str = "bart"
    """How the config and the weights read (``LAYOUTS``): ``bart`` (``model.encoder.layers.0...``)
    or ``t5`` (``encoder.block.0.layer.0...``)."""


def _marian_files(directory: Path) -> tuple[Path, Path]:
    return directory / "source.spm", directory / "target.spm"


def _one_file(*names: str) -> Callable[[Path], tuple[Path, Path]]:
    def files(directory: Path) -> tuple[Path, Path]:
        for name in names:
            if (directory / name).is_file():
                return directory / name, directory / name
        raise MtkitError(f"{directory}: no tokenizer model ({' or '.join(names)})")
    return files


def _marian_languages(tokenizer: Any) -> Languages | None:
    codes = getattr(tokenizer, "supported_language_codes", [])
    if not codes:
        return None
    return Languages(tokens={code[2:-2]: code for code in codes}, source="tgt", target=None)


def _special_languages(tokenizer: Any) -> Languages | None:
    """M2M100, NLLB, mBART-50: the source's code first in the source, the target's forced first
    in the output. The codes are the tokenizer's extra special tokens (M2M100 writes them
    ``__de__`` and is called with ``de``)."""
    if getattr(tokenizer, "legacy_behaviour", False):
        raise MtkitError("tokenizer legacy_behaviour (language code after the source) is not supported")
    mapping = getattr(tokenizer, "lang_code_to_token", None)
    if mapping:
        tokens = dict(mapping)
    else:
        known = {tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token,
                 getattr(tokenizer, "mask_token", None), getattr(tokenizer, "sep_token", None),
                 getattr(tokenizer, "cls_token", None)}
        extra = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", [])
        if isinstance(extra, dict):
            extra = list(extra.values())
        tokens = {str(t): str(t) for t in extra if str(t) not in known}
    return Languages(tokens=tokens, source="src", target="tgt") if tokens else None


FAMILIES: dict[str, Family] = {
    "marian": Family("marian", _marian_files, _marian_languages,
                     lambda hf: {"norm": "post", "positions": "sinusoidal"}),
    "m2m_100": Family("m2m_100", _one_file("sentencepiece.bpe.model", "spm.model", "tokenizer.json"),
                      _special_languages, lambda hf: {"norm": "pre", "positions": "sinusoidal_fairseq"}),
    "mbart": Family("mbart", _one_file("sentencepiece.bpe.model", "tokenizer.json"), _special_languages,
                    lambda hf: {"norm": "pre", "positions": "learned", "share_positions": False,
                                "embedding_norm": True}, position_offset=2),
    # The classes mtkit exports its other models as (mtkit.export.HF_CLASSES), with Marian's tokenizer.
    "bart": Family("bart", _marian_files, _marian_languages,
                   lambda hf: {"norm": "post", "positions": "learned", "share_positions": False,
                               "embedding_norm": True}, position_offset=2),
    "blenderbot": Family("blenderbot", _marian_files, _marian_languages,
                         lambda hf: {"norm": "pre", "positions": "learned", "share_positions": False}),
    # T5 v1.0 (t5-small) and v1.1 (Flan-T5), and mT5 (v1.1's layers under another model_type).
    "t5": Family("t5", _one_file("spiece.model", "tokenizer.json"), lambda tokenizer: None, lambda hf: {},
                 layout="t5"),
    # transformers never scales mT5's decoder output (its configs untie the output projection).
    "mt5": Family("mt5", _one_file("spiece.model", "tokenizer.json"), lambda tokenizer: None,
                  lambda hf: {"scale_output": False}, layout="t5"),
    # Causal language models of Llama's layout (rotary positions, RMSNorm, SwiGLU, grouped-query
    # attention), translating by continuing a prompt (``DEFAULT_PROMPT``).
    "llama": Family("llama", _one_file("tokenizer.json"), lambda tokenizer: None, lambda hf: {}, layout="llama"),
    "mistral": Family("mistral", _one_file("tokenizer.json"), lambda tokenizer: None, lambda hf: {},
                      layout="llama"),
    # Qwen2 adds biases to the query, key and value projections.
    "qwen2": Family("qwen2", _one_file("tokenizer.json"), lambda tokenizer: None, lambda hf: {"bias": True},
                    layout="llama"),
}

DEFAULT_PROMPT = "Translate {src_lang} to {tgt_lang}:\n{source}\n"
"""The prompt a language model translates with unless the import names another (``--prompt``):
``{src_lang}``/``{tgt_lang}`` are filled in at import, ``{source}`` at every translation. The
target follows the newline."""

_ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu"}


# --------------------------------------------------------------------------- the import


def fetch(source: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The model directory of ``source`` (a local directory, or a hub id downloaded with
    huggingface_hub) and what to record of its origin."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise MtkitError(f"--revision {revision}: {source} is a local directory, not a hub id")
        return path, {"huggingface": str(path.resolve()), "revision": None}
    if path.exists() or source.startswith((".", "/")) or source.count("/") > 1:
        raise MtkitError(f"{source}: not a model directory (a save_pretrained directory or a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.spm", "*.model", "*.safetensors", "*.txt"]
    try:
        local = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise MtkitError(f"{source}: cannot download from the Hugging Face hub ({str(err).splitlines()[0]})") from None
    # The hub's cache names a snapshot directory by the commit it holds.
    return local, {"huggingface": source, "revision": revision, "commit": local.name}


def import_huggingface(source: str, out: Path, *, revision: str | None = None, force: bool = False,
                       src_lang: str | None = None, tgt_lang: str | None = None, prompt: str | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """Import the model ``source`` into the run directory ``out`` (written whole, atomically;
    an existing one is replaced only with ``force``). ``src_lang``/``tgt_lang``: the languages
    a multilingual model translates between by default (its codes); for a language model, the
    names its prompt gives them. ``prompt``: a language model's prompt template (default
    ``DEFAULT_PROMPT``)."""
    out = Path(out)
    if out.exists() and not force:
        raise MtkitError(f"{out}: already exists; pass --force to replace it")
    directory, origin = fetch(source, revision)
    transformers = _transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise MtkitError(f"{directory}: no readable config.json ({str(err).splitlines()[0]})") from None
    family = FAMILIES.get(hf_config.model_type)
    if family is None:
        raise MtkitError(f"{directory}: model_type {hf_config.model_type!r} cannot be imported "
                         f"(mtkit imports {', '.join(FAMILIES)})")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    layout = LAYOUTS[family.layout]
    causal = family.layout == "llama"
    if prompt is not None and not causal:
        raise MtkitError(f"--prompt: {hf_config.model_type} is a translation model, which takes no prompt")
    if causal:
        prompt = _prompt(prompt, src_lang, tgt_lang)
    # What mtkit cannot compute is refused here, naming the config field, before the weights load.
    architecture = {**layout.model(hf_config, tokenizer), **family.model(hf_config)}
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSeq2SeqLM
    model = auto.from_pretrained(directory, dtype=torch.float32).eval()
    rows = causal_rows(hf_config, tokenizer) if causal else special_rows(hf_config, tokenizer)
    languages = family.languages(tokenizer)
    config = _config(hf_config, architecture, model, tokenizer, languages, out, src_lang, tgt_lang)
    state = layout.weights(model.state_dict(), config.model, rows, family.position_offset)
    from mtkit.checkpoint import checkpoints_dir, mark_final, save_checkpoint
    from mtkit.models import build_model

    with atomic_dir(out) as tmp:
        tokenizers = _write_tokenizer(family, directory, tokenizer, rows, languages, tmp / "tokenizer", prompt)
        ours = build_model(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size, tokenizers.shared_vocab)
        try:
            ours.load_state_dict(state, strict=True)
        except RuntimeError as err:  # a mapping bug, not a user mistake: keep the detail
            raise RuntimeError(f"{family.model_type} -> mtkit weight mapping does not fit: {err}") from err
        root = checkpoints_dir(tmp)
        step = save_checkpoint(root, step=0, epoch=0, model=ours, config=_relocated(config, out), tokenizers=tokenizers,
                               metrics={}, trainer_state={}, best=True, keep_last=1, source=origin)
        mark_final(root, step)
        shutil.rmtree(tmp / "tokenizer")
    log(f"imported {source} ({family.model_type}, {sum(p.numel() for p in ours.parameters()):,} parameters) -> {out}")
    return out


def _relocated(config: Config, out: Path) -> Config:
    config = config.model_copy(deep=True)
    config.experiment.dir = out
    return config


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MtkitError("transformers is not installed; run: pip install 'mtkit[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def special_rows(hf_config: Any, tokenizer: Any) -> list[int]:
    """The model's row (token id) for each mtkit id, in mtkit's order: PAD, UNK, BOS (the
    decoder start token), EOS, then every other row of the model in its own order."""
    vocab_size = hf_config.vocab_size
    specials = [hf_config.pad_token_id, tokenizer.unk_token_id, hf_config.decoder_start_token_id,
                hf_config.eos_token_id]
    for name, value in zip(("pad_token_id", "unk_token_id", "decoder_start_token_id", "eos_token_id"), specials,
                           strict=True):
        if value is None or not 0 <= value < vocab_size:
            raise MtkitError(f"config.json: {name} is {value!r}, not an id of the {vocab_size}-token vocabulary")
    taken = set(specials)
    return specials + [i for i in range(vocab_size) if i not in taken]


def causal_rows(hf_config: Any, tokenizer: Any) -> list[int]:
    """``special_rows`` of a language model: EOS is the model's (the first where it names
    several); BOS, UNK and PAD are its tokenizer's where it has them and they are not taken, else
    rows added after the model's (``vocab_size`` on: zero embeddings, masked output columns).
    mtkit's BOS is never fed to a language model (its prompt's last token stands there)."""
    vocab_size = hf_config.vocab_size
    eos = hf_config.eos_token_id if hf_config.eos_token_id is not None else tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None or not 0 <= eos < vocab_size:
        raise MtkitError(f"config.json: eos_token_id is {eos!r}, not an id of the {vocab_size}-token vocabulary")
    taken, added = {EOS_ID: eos}, vocab_size
    for mtkit_id, value in ((BOS_ID, tokenizer.bos_token_id), (UNK_ID, tokenizer.unk_token_id),
                            (PAD_ID, tokenizer.pad_token_id)):
        if value is None or value in taken.values() or not 0 <= value < vocab_size:
            value, added = added, added + 1
        taken[mtkit_id] = value
    specials = [taken[i] for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)]
    return specials + [i for i in range(vocab_size) if i not in set(specials)]


def masked_columns(rows: list[int]) -> list[int]:
    """mtkit ids whose output column duplicates another's (the model has one column for both):
    PAD where the decoder starts with padding (Marian), else BOS where it starts with EOS."""
    if rows[BOS_ID] == rows[PAD_ID]:
        return [PAD_ID]
    if rows[BOS_ID] in (rows[EOS_ID], rows[UNK_ID]):
        return [BOS_ID]
    return []


def _bart_model(hf: Any, tokenizer: Any) -> dict[str, Any]:
    """The ``model`` config keys of a BART-lineage model that its config gives (the family's own
    and those read off the weights aside)."""
    activation = _ACTIVATIONS.get(hf.activation_function)
    if activation is None:
        raise MtkitError(f"config.json: activation_function {hf.activation_function!r} is not supported "
                         f"({', '.join(_ACTIVATIONS)})")
    if hf.encoder_attention_heads != hf.decoder_attention_heads or hf.encoder_ffn_dim != hf.decoder_ffn_dim:
        raise MtkitError("config.json: encoder and decoder of different widths are not supported")
    if not getattr(hf, "share_encoder_decoder_embeddings", True):
        # Marian's target_vocab.json: a second id space, which the tokenizer mapping lacks.
        raise MtkitError("config.json: share_encoder_decoder_embeddings is false (separate source and target "
                         "vocabularies), which mtkit does not import yet")
    return {
        "d_model": hf.d_model,
        "encoder_layers": hf.encoder_layers,
        "decoder_layers": hf.decoder_layers,
        "heads": hf.encoder_attention_heads,
        "ffn_dim": hf.encoder_ffn_dim,
        "dropout": hf.dropout,
        "attention_dropout": hf.attention_dropout,
        "activation_dropout": hf.activation_dropout,
        "activation": activation,
        "max_positions": hf.max_position_embeddings,
        "scale_embeddings": bool(hf.scale_embedding),
    }


_T5_ACTIVATIONS = {(False, "relu"): "relu", (False, "gelu"): "gelu", (False, "silu"): "silu",
                   (False, "swish"): "silu", (True, "gelu_new"): "geglu", (True, "gelu_pytorch_tanh"): "geglu",
                   (True, "silu"): "swiglu", (True, "swish"): "swiglu"}
"""T5's feed-forward (``is_gated_act``, ``dense_act_fn``) -> ``model.activation``. transformers' gelu is
the exact one, as mtkit's; gelu_new and gelu_pytorch_tanh are the tanh approximation (``gated-gelu``,
T5 v1.1), as mtkit's geglu. A gated block is ``wo(act(wi_0 x) * wi_1 x)``."""

T5_MAX_POSITIONS = 512
"""``model.max_positions`` of an imported T5 whose tokenizer sets no ``model_max_length``: the
length T5 was trained at. Relative positions hold no table, so this is only mtkit's length limit."""


def _t5_model(hf: Any, tokenizer: Any) -> dict[str, Any]:
    """The ``model`` config keys of a T5 (``T5Config``, ``MT5Config``): pre-norm RMSNorm blocks
    without biases, relative position buckets, unscaled embeddings and attention logits, the
    decoder's output scaled by d_model^-0.5 where transformers scales it."""
    gated, act = bool(hf.is_gated_act), str(hf.dense_act_fn)
    activation = _T5_ACTIVATIONS.get((gated, act))
    if activation is None:
        known = sorted({f"{'gated-' if g else ''}{a}" for g, a in _T5_ACTIVATIONS})
        raise MtkitError(f"config.json: feed_forward_proj {hf.feed_forward_proj!r} ({'gated ' if gated else ''}"
                         f"dense_act_fn {act!r}) is not supported ({', '.join(known)})")
    # transformers 5 keeps T5 v1.0's scaling in scale_decoder_outputs (tie_word_embeddings is forced
    # on); before it, tie_word_embeddings said both.
    scale = getattr(hf, "scale_decoder_outputs", getattr(hf, "tie_word_embeddings", True))
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers writes "no limit" as a huge number (1e30).
    max_positions = int(limit) if isinstance(limit, int) and 8 <= limit < 10**6 else T5_MAX_POSITIONS
    return {
        "d_model": hf.d_model,
        "encoder_layers": hf.num_layers,
        "decoder_layers": hf.num_decoder_layers,
        "heads": hf.num_heads,
        "head_dim": hf.d_kv,
        "ffn_dim": hf.d_ff,
        # T5 drops out at these three places at one rate (and after each stack's final norm, which
        # mtkit does not: fine-tuning differs there only).
        "dropout": hf.dropout_rate,
        "attention_dropout": hf.dropout_rate,
        "activation_dropout": hf.dropout_rate,
        "activation": activation,
        "norm": "pre",
        "norm_type": "rms",
        "norm_eps": hf.layer_norm_epsilon,
        "bias": False,
        "positions": "relative",
        "relative_buckets": hf.relative_attention_num_buckets,
        "relative_max_distance": hf.relative_attention_max_distance,
        "max_positions": max_positions,
        "scale_embeddings": False,
        "scale_attention": False,
        "scale_output": bool(scale),
    }


def _tables(weights: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The encoder's and the decoder's embedding tables and the output projection of a model's
    ``state_dict``, in the model's own row order (BART's names under ``model.``, T5's at the top)."""
    prefix = "model." if "model.shared.weight" in weights else ""
    encoder, decoder = (weights.get(f"{prefix}{side}.embed_tokens.weight", weights[f"{prefix}shared.weight"])
                        for side in ("encoder", "decoder"))
    return encoder, decoder, weights.get("lm_head.weight", decoder)


def _config(hf: Any, architecture: dict[str, Any], model: Any, tokenizer: Any, languages: Languages | None,
            out: Path, src_lang: str | None, tgt_lang: str | None) -> Config:
    weights = model.state_dict()
    if architecture.get("arch") == "decoder_only":
        # One table; the output projection is tied where it is the same tensor. The languages
        # are the names the prompt gives them.
        tied = torch.equal(weights["model.embed_tokens.weight"], weights.get("lm_head.weight",
                                                                           weights["model.embed_tokens.weight"]))
        model_cfg = {"output_bias": True, "share_embeddings": True, "tie_output": tied, **architecture}
        return validate_config({"experiment": {"dir": str(out)}, "model": model_cfg,
                                "data": {"src_lang": src_lang or "src", "tgt_lang": tgt_lang or "tgt"},
                                "decode": _generation(model)})
    # Whether tables are one is read off the weights: configs of the BART family do not all say.
    encoder, decoder, output = _tables(weights)
    model_cfg = {
        "arch": "encoder_decoder",
        "output_bias": True,
        "share_embeddings": torch.equal(encoder, decoder),
        "tie_output": torch.equal(decoder, output),
        **architecture,
    }
    decode = _generation(model)
    data = {"src_lang": src_lang or getattr(tokenizer, "src_lang", None) or getattr(tokenizer, "source_lang", None),
            "tgt_lang": tgt_lang or getattr(tokenizer, "tgt_lang", None) or getattr(tokenizer, "target_lang", None)}
    given = {"src_lang": src_lang, "tgt_lang": tgt_lang}
    for key, code in data.items():
        # A multilingual model's languages are its codes (checked); the others are labels.
        told = languages is not None and (languages.source == "src" or key == "tgt_lang")
        known = languages is not None and code in {*languages.tokens, *languages.tokens.values()}
        if told and code and not given[key] and not known:
            code = None  # the tokenizer's label of a group (Marian's "ROMANCE"): no default language
        what = ("--source-lang" if key == "src_lang" else "--target-lang") if given[key] else f"tokenizer {key}"
        data[key] = _code(languages, code, what) if told and code else code
    data = {key: code or key.split("_")[0] for key, code in data.items()}
    config = validate_config({"experiment": {"dir": str(out)}, "data": data, "model": model_cfg, "decode": decode})
    return config


def _generation(model: Any) -> dict[str, Any]:
    """The ``decode`` settings of a model's generation config (beam size, length penalty)."""
    generation = getattr(model, "generation_config", None)
    decode: dict[str, Any] = {"length_penalty_form": "length", "allow_unk": True}
    if generation is not None:
        decode["beam"] = max(1, int(generation.num_beams or 1))
        decode["lenpen"] = max(0.0, float(generation.length_penalty if generation.length_penalty is not None else 1.0))
    return decode


def _prompt(template: str | None, src_lang: str | None, tgt_lang: str | None) -> str:
    """A language model's prompt template with its language names filled in (``DEFAULT_PROMPT``
    when none is given)."""
    template = DEFAULT_PROMPT if template is None else template
    for field, name, option in (("{src_lang}", src_lang, "--source-lang"), ("{tgt_lang}", tgt_lang, "--target-lang")):
        if field in template:
            if not name:
                raise MtkitError(f"{option}: a language model's prompt names the languages; give {option} "
                                 f"(e.g. English, German) or a --prompt without {field}")
            template = template.replace(field, name)
    try:
        return check_prompt(template, "--prompt")
    except ValueError as err:
        raise MtkitError(str(err)) from None


def _code(languages: Languages | None, code: str, what: str) -> str:
    """A language as the config keeps it: its code (``de``), checked against the model's."""
    assert languages is not None
    token = languages.token(code, what)
    return next(c for c, t in languages.tokens.items() if t == token)


def _copy_segmenter(source: Path, target: Path, text: str | None = None) -> None:
    """Copy a segmentation model (``text``: a ``tokenizer.json``'s text to write instead); a
    ``tokenizer.json`` loses the padding and truncation it may carry (transformers saves those of
    the tokenizer's last call), which would pad or cut each sentence mtkit segments."""
    if source.suffix != ".json":
        shutil.copyfile(source, target)
        return
    spec = json.loads(text if text is not None else source.read_text(encoding="utf-8"))
    spec.update(padding=None, truncation=None)
    atomic_write_text(target, json.dumps(spec, ensure_ascii=False) + "\n")


def _write_tokenizer(family: Family, directory: Path, tokenizer: Any, rows: list[int],
                     languages: Languages | None, out: Path, prompt: str | None = None) -> Tokenizers:
    """mtkit's tokenizer directory: the segmentation model(s), the vocabulary in mtkit's id
    order, and meta.json (with the language tokens; a language model's prompt template, and
    whether its tokenizer starts a text with BOS)."""
    out.mkdir(parents=True)
    # An mtkit export (of any class) carries a MarianTokenizer's files.
    exported = (directory / "source.spm").is_file()
    src_file, tgt_file = _marian_files(directory) if exported else family.tokenizer_files(directory)
    for path in {src_file, tgt_file}:
        if not path.is_file():
            raise MtkitError(f"{path}: missing; the model's tokenizer needs it")
    names = {"src": "src" + src_file.suffix, "tgt": "tgt" + tgt_file.suffix}
    joint = src_file == tgt_file
    if joint:
        names = {"src": "spm" + src_file.suffix, "tgt": "spm" + src_file.suffix}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if family.layout == "llama" and backend is not None:
        # What transformers segments with: a tokenizer class may put its own pre-tokenizer over
        # the file's (Qwen2's digits one by one).
        _copy_segmenter(src_file, out / names["src"], backend.to_str())
    else:
        _copy_segmenter(src_file, out / names["src"])
    if not joint:
        _copy_segmenter(tgt_file, out / names["tgt"])
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if languages is not None:  # M2M100Tokenizer.get_vocab() leaves out its language tokens
        by_id.update({tokenizer.convert_tokens_to_ids(token): token for token in languages.tokens.values()})
    pieces = ["<pad>", "<unk>", "<s>", "</s>"]
    for row in rows[4:]:
        piece = by_id.get(row, f"<unused{row}>")
        # Pieces are unique (a runtime's vocabulary maps them to ids): a token named as one of
        # mtkit's specials (M2M100's own ``<s>``, never produced) keeps its row under another name.
        pieces.append(piece if piece not in pieces[:4] else f"{piece}{row}")
    atomic_write_text(out / VOCAB_FILE, json.dumps(pieces, ensure_ascii=False) + "\n")
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "joint": joint,
        "type": "imported",
        "vocab_size": {"src": len(pieces), "tgt": len(pieces)},
        "files": names,
        "vocab": {"src": VOCAB_FILE, "tgt": VOCAB_FILE},
        "normalization": "imported",
        "fingerprint": "",
    }
    if languages is not None:
        meta["languages"] = languages.to_meta()
    source_bos = False
    if prompt is not None:
        bos = tokenizer.bos_token_id
        source_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        meta.update(prompt=prompt, source_bos=source_bos)
    files = [out / names["src"]] if joint else [out / names["src"], out / names["tgt"]]
    meta["fingerprint"] = files_fingerprint([*files, out / VOCAB_FILE], prompt, source_bos)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Tokenizers.load(out)


# --------------------------------------------------------------------------- weights


def mtkit_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, rows: list[int], position_offset: int = 0
                     ) -> dict[str, Tensor]:
    """mtkit's weights from a BART-lineage model's ``state_dict`` (``model.encoder.layers.0...``):
    embedding rows and output columns permuted by ``rows`` (see ``special_rows``), query, key
    and value fused, learned positions without their ``position_offset`` rows."""
    index = torch.tensor(rows)
    out: dict[str, Tensor] = {}
    enc = "model.encoder.embed_tokens.weight" if "model.encoder.embed_tokens.weight" in hf else "model.shared.weight"
    dec = "model.decoder.embed_tokens.weight" if "model.decoder.embed_tokens.weight" in hf else "model.shared.weight"
    out["src_embed.weight"] = hf[enc][index]
    out["tgt_embed.weight"] = hf[dec][index]
    out["output_proj.weight"] = hf.get("lm_head.weight", hf[dec])[index]
    bias = hf.get("final_logits_bias", torch.zeros(1, len(rows)))[0][index].clone()
    bias[masked_columns(rows)] = MASKED_LOGIT
    out["output_proj.bias"] = bias
    if cfg.positions == "learned":
        end = position_offset + cfg.max_positions
        out["positions.weight"] = hf["model.encoder.embed_positions.weight"][position_offset:end]
        if not cfg.share_positions:
            out["decoder_positions.weight"] = hf["model.decoder.embed_positions.weight"][position_offset:end]
    for side, ours in (("encoder", "encoder_layers"), ("decoder", "decoder_layers")):
        layers = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        for i in range(layers):
            theirs, mine = f"model.{side}.layers.{i}.", f"{ours}.{i}."
            for kind in ("weight", "bias"):
                attn = theirs + "self_attn."
                out[f"{mine}self_attn.qkv_proj.{kind}"] = torch.cat(
                    [hf[f"{attn}{p}_proj.{kind}"] for p in "qkv"], dim=0)
                out[f"{mine}self_attn.out_proj.{kind}"] = hf[f"{attn}out_proj.{kind}"]
                names = ["self_attn_layer_norm", "final_layer_norm"]
                if side == "decoder":
                    cross = theirs + "encoder_attn."
                    out[f"{mine}encoder_attn.q_proj.{kind}"] = hf[f"{cross}q_proj.{kind}"]
                    out[f"{mine}encoder_attn.kv_proj.{kind}"] = torch.cat(
                        [hf[f"{cross}k_proj.{kind}"], hf[f"{cross}v_proj.{kind}"]], dim=0)
                    out[f"{mine}encoder_attn.out_proj.{kind}"] = hf[f"{cross}out_proj.{kind}"]
                    names.append("encoder_attn_layer_norm")
                for name in names:
                    out[f"{mine}{name}.{kind}"] = hf[f"{theirs}{name}.{kind}"]
                for fc in ("fc1", "fc2"):
                    out[f"{mine}ffn.{fc}.{kind}"] = hf[f"{theirs}{fc}.{kind}"]
        for kind in ("weight", "bias"):
            if cfg.norm == "pre":
                out[f"{side}_layer_norm.{kind}"] = hf[f"model.{side}.layer_norm.{kind}"]
            if cfg.embedding_norm:
                out[f"{side}_embedding_norm.{kind}"] = hf[f"model.{side}.layernorm_embedding.{kind}"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}



def t5_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, rows: list[int], position_offset: int = 0
                  ) -> dict[str, Tensor]:
    """mtkit's weights from a T5's ``state_dict`` (``encoder.block.0.layer.0.SelfAttention.q...``):
    embedding rows and output columns permuted by ``rows`` (see ``special_rows``), query, key and
    value fused, block 0's relative position table of each stack as the stack's one table, the
    gated feed-forward's ``wi_0`` (activated) as ``gate`` and ``wi_1`` as ``fc1``.
    ``position_offset`` is unused (T5 has no position table)."""
    index = torch.tensor(rows)
    encoder, decoder, output = _tables(hf)
    out: dict[str, Tensor] = {"src_embed.weight": encoder[index], "tgt_embed.weight": decoder[index],
                              "output_proj.weight": output[index]}
    bias = torch.zeros(len(rows))
    bias[masked_columns(rows)] = MASKED_LOGIT
    out["output_proj.bias"] = bias
    for side in ("encoder", "decoder"):
        # T5 keeps a stack's one table in its first block: ``(buckets, heads)``, as mtkit's.
        table = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[f"{side}_relative.embed.weight"] = hf[table]
        out[f"{side}_layer_norm.weight"] = hf[f"{side}.final_layer_norm.weight"]
        layers = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        for i in range(layers):
            theirs, mine = f"{side}.block.{i}.layer.", f"{side}_layers.{i}."
            attn = f"{theirs}0.SelfAttention."
            out[f"{mine}self_attn.qkv_proj.weight"] = torch.cat([hf[f"{attn}{p}.weight"] for p in "qkv"], dim=0)
            out[f"{mine}self_attn.out_proj.weight"] = hf[f"{attn}o.weight"]
            out[f"{mine}self_attn_layer_norm.weight"] = hf[f"{theirs}0.layer_norm.weight"]
            ff = f"{theirs}1." if side == "encoder" else f"{theirs}2."
            if side == "decoder":
                cross = f"{theirs}1.EncDecAttention."
                out[f"{mine}encoder_attn.q_proj.weight"] = hf[f"{cross}q.weight"]
                out[f"{mine}encoder_attn.kv_proj.weight"] = torch.cat([hf[f"{cross}k.weight"], hf[f"{cross}v.weight"]])
                out[f"{mine}encoder_attn.out_proj.weight"] = hf[f"{cross}o.weight"]
                out[f"{mine}encoder_attn_layer_norm.weight"] = hf[f"{theirs}1.layer_norm.weight"]
            dense = f"{ff}DenseReluDense."
            if f"{dense}wi_0.weight" in hf:
                out[f"{mine}ffn.gate.weight"] = hf[f"{dense}wi_0.weight"]
                out[f"{mine}ffn.fc1.weight"] = hf[f"{dense}wi_1.weight"]
            else:
                out[f"{mine}ffn.fc1.weight"] = hf[f"{dense}wi.weight"]
            out[f"{mine}ffn.fc2.weight"] = hf[f"{dense}wo.weight"]
            out[f"{mine}final_layer_norm.weight"] = hf[f"{ff}layer_norm.weight"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def _llama_model(hf: Any, tokenizer: Any) -> dict[str, Any]:
    """The ``model`` config keys of a Llama-layout language model (``LlamaConfig``,
    ``MistralConfig``, ``Qwen2Config``): a decoder-only stack of pre-norm RMSNorm blocks, rotary
    positions (half-split), SwiGLU, ``num_key_value_heads`` key/value heads, unscaled
    embeddings, causal attention over the prompt, which the target continues (``separator:
    none``). A sliding window (Mistral) bounds the sequence to the window, within which
    attention is full."""
    if str(hf.hidden_act) not in ("silu", "swish"):
        raise MtkitError(f"config.json: hidden_act {hf.hidden_act!r} is not supported (silu)")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise MtkitError(f"config.json: rope scaling {kind!r} is not supported (plain rotary positions only)")
    if float(getattr(hf, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise MtkitError("config.json: partial_rotary_factor below 1 is not supported")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    max_positions = int(hf.max_position_embeddings)
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window:
        max_positions = min(max_positions, int(window))
    return {
        "arch": "decoder_only",
        "d_model": hf.hidden_size,
        "encoder_layers": 0,
        "decoder_layers": hf.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "ffn_dim": hf.intermediate_size,
        "dropout": 0.0,
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        "activation_dropout": 0.0,
        "activation": "swiglu",
        "norm": "pre",
        "norm_type": "rms",
        "norm_eps": hf.rms_norm_eps,
        "bias": bool(getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False)),
        "positions": "rope",
        "rope_base": float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        "max_positions": max_positions,
        "scale_embeddings": False,
        "scale_attention": True,
        "source_attention": "causal",
        "target_positions": "continue",
        "separator": "none",
    }


def llama_state_dict(hf: dict[str, Tensor], cfg: ModelConfig, rows: list[int], position_offset: int = 0
                     ) -> dict[str, Tensor]:
    """mtkit's weights from a Llama-layout ``state_dict`` (``model.layers.0.self_attn.q_proj...``):
    embedding rows and output columns permuted by ``rows`` (``causal_rows``; rows past the
    model's are zero, their output columns masked), query, key and value fused, ``gate_proj``
    (activated) as ``gate``, ``up_proj`` as ``fc1``, ``down_proj`` as ``fc2``. A bias the model
    lacks where ``model.bias`` gives mtkit one (Qwen2's output and feed-forward projections) is
    zero. ``position_offset`` is unused."""
    embed = hf["model.embed_tokens.weight"]
    vocab = embed.shape[0]
    index = torch.tensor(rows)

    def table(weight: Tensor) -> Tensor:
        return torch.cat([weight, weight.new_zeros(len(rows) - vocab, weight.shape[1])])[index]

    out: dict[str, Tensor] = {"src_embed.weight": table(embed), "tgt_embed.weight": table(embed),
                              "output_proj.weight": table(hf.get("lm_head.weight", embed)),
                              "layer_norm.weight": hf["model.norm.weight"]}
    bias = torch.zeros(len(rows))
    bias[[i for i, row in enumerate(rows) if row >= vocab]] = MASKED_LOGIT
    out["output_proj.bias"] = bias

    def linear(mine: str, theirs: list[str]) -> None:
        out[f"{mine}.weight"] = torch.cat([hf[f"{name}.weight"] for name in theirs])
        if cfg.bias:
            out[f"{mine}.bias"] = torch.cat([hf.get(f"{name}.bias", hf[f"{name}.weight"].new_zeros(
                hf[f"{name}.weight"].shape[0])) for name in theirs])

    for i in range(cfg.decoder_layers):
        theirs, mine = f"model.layers.{i}.", f"layers.{i}."
        linear(f"{mine}self_attn.qkv_proj", [f"{theirs}self_attn.{p}_proj" for p in "qkv"])
        linear(f"{mine}self_attn.out_proj", [f"{theirs}self_attn.o_proj"])
        linear(f"{mine}ffn.gate", [f"{theirs}mlp.gate_proj"])
        linear(f"{mine}ffn.fc1", [f"{theirs}mlp.up_proj"])
        linear(f"{mine}ffn.fc2", [f"{theirs}mlp.down_proj"])
        out[f"{mine}self_attn_layer_norm.weight"] = hf[f"{theirs}input_layernorm.weight"]
        out[f"{mine}final_layer_norm.weight"] = hf[f"{theirs}post_attention_layernorm.weight"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


@dataclass(frozen=True)
class Layout:
    """How a lineage's config and weights read (``Family.layout``)."""

    model: Callable[[Any, Any], dict[str, Any]]
    """The ``model`` config keys from the transformers config and tokenizer (``MtkitError``, naming
    the config field, for what mtkit cannot compute)."""
    weights: Callable[[dict[str, Tensor], ModelConfig, list[int], int], dict[str, Tensor]]
    """mtkit's state dict from the model's, its rows permuted (``special_rows``), and the offset
    of a learned position table."""


LAYOUTS: dict[str, Layout] = {
    "bart": Layout(_bart_model, mtkit_state_dict),
    "t5": Layout(_t5_model, t5_state_dict),
    "llama": Layout(_llama_model, llama_state_dict),
}
