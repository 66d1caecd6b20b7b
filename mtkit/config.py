"""The experiment config: one YAML file, one typed section per stage.

Every field has a type, a default and a docstring (shown by ``mtkit config show --doc``).
Unknown keys, wrong types and impossible values are all reported at once, one line each,
naming the key path and, for a typo, the nearest valid key. Nothing outside this module
reads raw dictionaries or calls ``cfg.get(key, default)``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtkit.errors import ConfigError, MtkitError

# A config is small; a file over this size, or one using more YAML aliases than any real
# config would, is refused before it is expanded (a "billion laughs" document).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 64


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


class ExperimentConfig(Section):
    dir: Path = Path("runs/default")
    """Output directory of the experiment: tokenizer, data, checkpoints, translations, reports."""
    name: str | None = None
    """A label for reports; defaults to the directory name."""
    seed: int = Field(default=1, ge=0)
    """Seed for every random choice (sampling, shuffling, initialisation, dropout)."""


class CorpusConfig(Section):
    format: Literal["text", "tsv", "jsonl", "tmx", "hub"] = "text"
    """text: two files, one sentence a line (Moses and OPUS file pairs); tsv: one file, two
    columns; jsonl: one JSON object a line; tmx: a TMX translation memory; hub: a Hugging Face hub
    dataset by name (needs internet)."""
    src: Path | None = None
    """text: the source-language file (plain or .gz)."""
    tgt: Path | None = None
    """text: the target-language file (plain or .gz)."""
    path: Path | None = None
    """tsv/jsonl/tmx: the file (plain or .gz)."""
    src_field: str = "src"
    """tsv: column index (0-based) or header name; jsonl/hub: field name, dotted for nested
    fields (for example ``translation.en``); tmx: the source's language code, as in the
    ``xml:lang`` of its ``<tuv>`` (matched case-insensitively; ``en`` also finds ``en-US``)."""
    tgt_field: str = "tgt"
    """Like ``src_field``, for the target side."""
    header: bool = False
    """tsv: the first line holds column names."""
    name: str | None = None
    """hub: dataset name, for example ``wmt14``."""
    subset: str | None = None
    """hub: dataset configuration, for example ``de-en``."""
    split: str = Field(default=None, validate_default=True)  # None is filled in before validation
    """hub: split to read; a training corpus reads ``train`` unless told. A valid or test corpus
    must name its split (hub datasets call them ``validation``, ``test``, ``dev``...), so that a
    config never evaluates on training data by default."""
    limit: int | None = Field(default=None, ge=1)
    """Read at most this many pairs (for quick runs and tests)."""
    src_lang: str | None = None
    """The language of the source side (default ``data.src_lang``). Corpora of several
    directions make a multilingual experiment (docs/multilingual.md)."""
    tgt_lang: str | None = None
    """The language of the target side (default ``data.tgt_lang``)."""
    weight: float = Field(default=1.0, gt=0)
    """Training: how many times an epoch counts this corpus's pairs (2: each twice, as upsampling
    real data beside back-translations; 0.5: half of them, drawn anew each epoch)."""

    # Non-hub corpora hold "train" too, as they always have: the pipeline's stage hashes include it.
    @field_validator("split", mode="before")
    @classmethod
    def _default_split(cls, value: Any, info: ValidationInfo) -> Any:
        return "train" if value is None else value

    @model_validator(mode="after")
    def _needs_inputs(self) -> CorpusConfig:
        missing = {
            "text": [k for k in ("src", "tgt") if getattr(self, k) is None],
            "tsv": ["path"] if self.path is None else [],
            "jsonl": ["path"] if self.path is None else [],
            "tmx": ["path"] if self.path is None else [],
            "hub": ["name"] if self.name is None else [],
        }[self.format]
        if self.format == "tmx":
            missing += [f"{key} (the language code of that side)" for key in ("src_field", "tgt_field")
                        if key not in self.model_fields_set]
        if missing:
            raise ValueError(f"format '{self.format}' needs {', '.join(missing)}")
        if self.format == "tsv" and not self.header:
            named = [f"{key} {getattr(self, key)!r}" for key in ("src_field", "tgt_field")
                     if not is_column_index(getattr(self, key))]
            if named:
                raise ValueError(f"format 'tsv' without a header needs 0-based column numbers, not "
                                 f"{' and '.join(named)} (give numbers, or set header: true to use column names)")
        return self


def is_column_index(spec: str) -> bool:
    """A TSV column given by its 0-based number rather than by its header name."""
    return spec.isascii() and spec.isdigit()


class EvalCorpusConfig(CorpusConfig):
    """A valid or test corpus: like a training corpus, but a hub one names its split."""

    @field_validator("split", mode="before")
    @classmethod
    def _default_split(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("format") == "hub":
            raise ValueError("required for a hub corpus outside training (the dataset's evaluation split, "
                             "e.g. validation or test); only training corpora default to train")
        return "train" if value is None else value


class DataConfig(Section):
    src_lang: str = "src"
    """Source language code (used in file names and to pick the BLEU tokenizer)."""
    tgt_lang: str = "tgt"
    """Target language code."""
    train: list[CorpusConfig] = Field(default_factory=list)
    """Training corpora, concatenated in order. A single mapping is accepted too."""
    valid: EvalCorpusConfig | list[EvalCorpusConfig] | None = None
    """Validation corpus (loss, BLEU and checkpoint selection during training); a multilingual
    experiment lists one per direction (BLEU per direction, selection on their mean)."""
    test: EvalCorpusConfig | list[EvalCorpusConfig] | None = None
    """Test corpus (translated and scored by the pipeline); a multilingual experiment may list
    one per direction."""
    language_token: Literal["source", "target"] = "source"
    """How a multilingual model (corpora of several directions) is told the language to
    translate into: ``source``, a ``<2xx>`` token starting the source (Sockeye, opus-mt), or
    ``target``, the same token forced as the first output token (NLLB). Never in the output."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling over directions: each epoch draws direction i's pairs in proportion to
    ``(n_i / N) ** (1 / temperature)`` (fairseq's temperature sampling; 1: as they come, larger:
    closer to uniform, the small directions repeated). Only with several directions."""
    max_len: int = Field(default=250, ge=1)
    """Drop training pairs with more subword tokens than this on either side."""
    min_len: int = Field(default=1, ge=1)
    """Drop training pairs with fewer subword tokens than this on either side."""
    max_ratio: float = Field(default=3.0, gt=0)
    """Drop training pairs whose token-length ratio (longer/shorter) exceeds this."""
    dedup: bool = True
    """Remove exact duplicate training pairs."""
    remove_eval_overlap: bool = False
    """Remove training pairs whose source sentence appears in the valid or test set."""
    invalid_utf8: Literal["error", "skip"] = "error"
    """What to do with a line that is not UTF-8: stop with an error naming file and line, or
    skip the pair and count it in the report."""
    num_proc: int = Field(default=1, ge=1)
    """Threads encoding with SentencePiece while the main thread reads, cleans and writes (the
    encoding lets go of the GIL, so reading overlaps it: 1 already keeps two cores busy)."""
    chunk_size: int = Field(default=10_000, ge=1)
    """Pairs read, cleaned and encoded at a time (bounds memory on large corpora)."""

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("valid", "test", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return value[0] if isinstance(value, list) and len(value) == 1 else value or None

    @model_validator(mode="after")
    def _eval_directions(self) -> DataConfig:
        for split in ("valid", "test"):
            sets = self.eval_sets(split)
            directions = [self.direction(corpus) for corpus in sets]
            if any(corpus.weight != 1.0 for corpus in sets):
                raise ValueError(f"{split}: weight is for training corpora (an evaluation set is read once)")
            for i, direction in enumerate(directions):
                if direction in directions[:i]:
                    raise ValueError(f"{split}: two corpora of direction {'-'.join(direction)} "
                                     "(one per direction; set src_lang/tgt_lang on each)")
        return self

    def direction(self, corpus: CorpusConfig) -> tuple[str, str]:
        """The (source, target) languages of ``corpus``: its own, else the section's."""
        return corpus.src_lang or self.src_lang, corpus.tgt_lang or self.tgt_lang

    def directions(self) -> list[tuple[str, str]]:
        """The training directions, in the order their corpora first appear."""
        return list(dict.fromkeys(self.direction(corpus) for corpus in self.train))

    @property
    def multilingual(self) -> bool:
        """More than one training direction: a language token tells the model its target."""
        return len(self.directions()) > 1

    def eval_sets(self, split: Literal["valid", "test"]) -> list[EvalCorpusConfig]:
        """The corpora of ``data.valid`` or ``data.test`` as a list (empty when unset)."""
        value = getattr(self, split)
        return [] if value is None else value if isinstance(value, list) else [value]


class TokenizerConfig(Section):
    type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece model type."""
    vocab_size: int = Field(default=8000, ge=16)
    """Vocabulary size (per side when not joint)."""
    joint: bool = True
    """One vocabulary for both languages (allows shared embeddings) or one model per side."""
    character_coverage: float = Field(default=1.0, gt=0, le=1)
    """Share of characters covered by the vocabulary; 0.9995 suits languages with large
    character sets (zh, ja)."""
    input_sentence_size: int = Field(default=1_000_000, gt=100)
    """Sentences sampled from the training data to train SentencePiece (bounds memory/time;
    SentencePiece needs more than 100)."""
    user_symbols: list[str] = Field(default_factory=list)
    """Extra symbols never split, such as language tags (``<2de>``)."""
    normalization: Literal["identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"] = "identity"
    """SentencePiece's normalisation rule, applied before encoding. identity keeps text as
    written, so a translation can hold every character of its references (full-width
    ``，？！：``, ``…``, ``²``, ligatures); nmt_nfkc (SentencePiece's own default) rewrites
    them (``, ? ! :``, ``...``, ``2``, ``fi``). mtkit's whitespace and control-character cleanup
    comes first either way, in prepare and in translate alike. The rule is stored with the
    tokenizer; the pipeline trains it again when the config names another (one that recorded
    none was trained with nmt_nfkc)."""
    byte_fallback: bool = False
    """Spell characters outside the vocabulary as their UTF-8 bytes (256 byte pieces) instead
    of <unk>, so that they can be read and produced. Use it for scripts with large alphabets
    (zh, ja, ko) together with character_coverage below 1, or for open-domain text whose rare
    characters the training data may lack; alphabetic scripts with full coverage do not need it."""
    num_threads: int = Field(default=2, ge=1)
    """Threads for SentencePiece training. SentencePiece's vocabulary can differ with the
    thread count; the pipeline treats it as operational and keeps a trained tokenizer."""


_T5_BLOCKS: dict[str, Any] = dict(norm="pre", norm_type="rms", positions="relative", activation="geglu", bias=False)
_LLAMA_BLOCKS: dict[str, Any] = dict(norm="pre", norm_type="rms", positions="rope", activation="swiglu", bias=False)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=128),
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, heads=4, ffn_dim=1024),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn_dim=2048),
    "big": dict(d_model=1024, encoder_layers=6, decoder_layers=6, heads=16, ffn_dim=4096),
    # Decoder-only sizes (model.arch=decoder_only: decoder_layers blocks, no encoder), each
    # matched to the encoder-decoder size it is named after: in non-embedding parameters (a
    # block is an encoder layer; a decoder layer adds cross-attention, a third more), or in
    # layers (one block per layer of 3+3). docs/architectures.md gives the counts.
    "tiny_decoder_only": dict(d_model=64, encoder_layers=0, decoder_layers=5, heads=4, ffn_dim=128),
    "small_decoder_only": dict(d_model=256, encoder_layers=0, decoder_layers=7, heads=4, ffn_dim=1024),
    "small_decoder_only_layers": dict(d_model=256, encoder_layers=0, decoder_layers=6, heads=4, ffn_dim=1024),
    # Family presets: today's blocks at the sizes above, with as many non-embedding parameters.
    # T5-style (Raffel et al., 2020, v1.1 blocks): RMSNorm, relative position bias, gated GELU,
    # no biases; a gated block has three matrices, so ffn_dim is two thirds of the size's.
    "t5_small": dict(d_model=256, encoder_layers=3, decoder_layers=3, heads=4, ffn_dim=680, **_T5_BLOCKS),
    "t5_base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn_dim=1360, **_T5_BLOCKS),
    # Llama-style decoder-only (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU, no
    # biases, grouped-query attention; blocks as many as small_decoder_only's (base: 14, as many
    # parameters as base's 6+6 layers), ffn_dim filling what the smaller key/value projections
    # and the third matrix leave.
    "llama_small": dict(arch="decoder_only", d_model=256, encoder_layers=0, decoder_layers=7, heads=4, kv_heads=2,
                        ffn_dim=768, **_LLAMA_BLOCKS),
    "llama_base": dict(arch="decoder_only", d_model=512, encoder_layers=0, decoder_layers=14, heads=8, kv_heads=2,
                       ffn_dim=1624, **_LLAMA_BLOCKS),
}


class ModelConfig(Section):
    arch: Literal["encoder_decoder", "decoder_only"] = "encoder_decoder"
    """encoder_decoder: an encoder and a decoder with cross-attention (Vaswani et al.);
    decoder_only: one stack of self-attention blocks over ``source EOS BOS target`` (the
    source as a prompt; see docs/architectures.md)."""
    size: Literal[
        "tiny", "small", "base", "big", "tiny_decoder_only", "small_decoder_only", "small_decoder_only_layers",
        "t5_small", "t5_base", "llama_small", "llama_base",
    ] = "small"
    """Named size or family preset; any key it sets that is given here overrides it. tiny is for
    tests, small for Multi30k on a CPU, base/big for GPUs. The *_decoder_only sizes are for
    model.arch=decoder_only: small_decoder_only has 7 blocks (as many non-embedding parameters as
    small), small_decoder_only_layers 6 (as many layers). t5_* and llama_* are today's blocks at
    the small and base sizes, parameter-matched: t5 an encoder-decoder with RMSNorm, relative
    position bias, GeGLU and no biases; llama a decoder-only model (arch set) with RMSNorm, rotary
    positions, SwiGLU, no biases and grouped-query attention (kv_heads 2)."""
    # The five sizes below come from the `size` preset unless given (`_fill_from_size` fills
    # them before validation), so a ModelConfig always holds ints.
    d_model: int = Field(ge=8)
    """Width of embeddings and hidden states (default: from size)."""
    encoder_layers: int = Field(ge=0)
    """Encoder layers (default: from size); 0 for model.arch=decoder_only."""
    decoder_layers: int = Field(ge=1)
    """Decoder layers, or the blocks of a decoder_only model (default: from size)."""
    heads: int = Field(ge=1)
    """Attention heads; must divide d_model (default: from size)."""
    ffn_dim: int = Field(ge=1)
    """Inner width of the feed-forward blocks (default: from size)."""
    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout on embeddings and sub-layer outputs."""
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on attention weights."""
    activation_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout after the feed-forward activation."""
    activation: Literal["relu", "gelu", "silu", "swiglu", "geglu"] = "relu"
    """Feed-forward activation. relu, gelu (exact, erf), silu (Marian's swish, used by the
    opus-mt models); or a gated feed-forward, ``fc2(act(gate(x)) * fc1(x))`` (Shazeer, 2020):
    swiglu (SiLU, as Llama), geglu (GELU's tanh approximation, as T5 v1.1 and Gemma). A gated
    block has a third matrix: give it two thirds of ffn_dim for as many parameters."""
    norm: Literal["pre", "post"] = "pre"
    """Layer norm before each sub-layer (stable, default) or after it (Vaswani et al.)."""
    norm_type: Literal["layer", "rms"] = "layer"
    """layer: LayerNorm (centred, scaled, with a bias unless ``bias: false``); rms: RMSNorm, a
    scale by the root mean square only (Zhang and Sennrich, 2019; T5, Llama)."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of every norm (LayerNorm's 1e-5; T5 and many Llama-family models use 1e-6)."""
    bias: bool = True
    """Biases on the attention and feed-forward projections and on layer norms (T5 and Llama
    have none)."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each attention head (None: d_model / heads); heads * head_dim may differ from
    d_model (T5 v1.1 and mT5 small: 6 heads of 64 over a d_model of 512)."""
    scale_attention: bool = True
    """Divide attention logits by sqrt(head_dim) (Vaswani et al.); T5 does not (its
    initialisation absorbs the factor)."""
    scale_output: bool = False
    """Multiply the decoder's output by d_model^-0.5 before the output projection (T5 with tied
    embeddings)."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads of attention (None: ``heads``, multi-head): fewer give grouped-query
    attention (Ainslie et al., 2023), 1 multi-query attention; each shares its keys and values
    with ``heads / kv_heads`` query heads, and the key/value cache shrinks by that factor."""
    positions: Literal["sinusoidal", "sinusoidal_fairseq", "learned", "rope", "relative"] = "sinusoidal"
    """Position information. Added to the embeddings: sinusoidal: sines then cosines, frequencies
    10000^(-i/(D/2)) (Marian, tensor2tensor); sinusoidal_fairseq: fairseq's table (frequencies
    10000^(-i/(D/2-1)), position 0 is fairseq's position 2, after its padding index), as M2M100 and
    NLLB use; learned: a trained table (mBART's, imported without its offset of 2). Inside
    attention: rope: queries and keys of self-attention rotated by their position (Su et al.,
    2021; the half-split layout of Llama in transformers, base ``rope_base``); relative: T5's
    trained bias per head on attention logits by bucketed distance (``relative_buckets``,
    ``relative_max_distance``), one table per stack shared by its layers."""
    rope_base: float = Field(default=10000.0, gt=1)
    """positions rope: the base of the rotation frequencies (Llama 2: 10000; Llama 3: 500000)."""
    relative_buckets: int = Field(default=32, ge=2)
    """positions relative: distance buckets (T5: 32): half exact, half logarithmic, per direction
    where attention looks both ways."""
    relative_max_distance: int = Field(default=128, ge=2)
    """positions relative: distances from this on share the last bucket (T5: 128)."""
    share_positions: bool = True
    """positions learned: one table for the encoder and the decoder, or one each (mBART's)."""
    max_positions: int = Field(default=1024, ge=8)
    """Longest sequence (in tokens, with BOS/EOS) the model accepts."""
    scale_embeddings: bool = True
    """Multiply token embeddings by sqrt(d_model) before adding positions (Vaswani et al.;
    Hugging Face's ``scale_embedding``)."""
    embedding_norm: bool = False
    """A layer norm on the embeddings (tokens plus positions) of the encoder and the decoder
    (mBART's ``layernorm_embedding``)."""
    output_bias: bool = False
    """A bias on the output logits (Marian's and mBART's ``final_logits_bias``)."""
    share_embeddings: bool = True
    """Share source and target embeddings (only possible with a joint vocabulary)."""
    tie_output: bool = True
    """Share the target embedding with the output projection."""
    source_attention: Literal["bidirectional", "causal"] = "bidirectional"
    """decoder_only: how source positions attend to each other. bidirectional: every source
    position sees the whole source (a prefix LM); causal: only the positions before it (a plain
    GPT-style LM, exportable to CTranslate2). Target positions always see the whole source and
    the target so far."""
    target_positions: Literal["continue", "restart"] = "restart"
    """decoder_only: the position of the first target token (the BOS after the source): restart
    at 0 (as in an encoder-decoder; the better of the two for the Multi30k prefix LM,
    docs/architectures.md) or continue after the source (one sequence, as a language model
    reads it; what CTranslate2 needs to run an exported causal model)."""

    separator: Literal["eos_bos", "none"] = "eos_bos"
    """decoder_only: how the target joins the source. eos_bos: ``source </s> <s> target``, the BOS
    predicting the first target token (mtkit's layout); none: the source is a prompt that the
    target continues directly, its last token predicting the first target token (a causal LM
    prompted with a template, as Llama-family models translate); mtkit's EOS after the source and
    BOS before the target are then never fed. none needs ``target_positions: continue`` and one
    shared embedding."""

    @property
    def target_follows_source(self) -> bool:
        """The target's positions come after the source's, in one table (a decoder-only model
        with ``target_positions: continue``): source and target share ``max_positions``."""
        return self.arch == "decoder_only" and self.target_positions == "continue"

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        """Sizes not given (or given as null) come from the preset of ``size`` (an unknown
        size is left for the field's own validation to report)."""
        if not isinstance(data, dict):
            return data
        size = data.get("size", "small")
        preset = MODEL_SIZES.get(size, {}) if isinstance(size, str) else {}
        return {**data, **{key: value for key, value in preset.items() if data.get(key) is None}}

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model}), or give head_dim")
        if self.heads % self.key_value_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.positions == "rope" and self.attention_head_dim % 2:
            raise ValueError(f"positions rope rotates pairs of dimensions: the head width "
                             f"({self.attention_head_dim}) must be even")
        return self

    @property
    def key_value_heads(self) -> int:
        """Key/value heads of each attention (``kv_heads``, else ``heads``)."""
        return self.kv_heads or self.heads

    @property
    def attention_head_dim(self) -> int:
        """Width of each attention head (``head_dim``, else ``d_model / heads``)."""
        return self.head_dim or self.d_model // self.heads

    @model_validator(mode="after")
    def _separator_fits(self) -> ModelConfig:
        if self.separator == "none" and not (self.arch == "decoder_only" and self.target_positions == "continue"):
            raise ValueError("separator none is for arch decoder_only with target_positions continue (the target "
                             "continues the prompt)")
        return self

    @model_validator(mode="after")
    def _layers_fit_arch(self) -> ModelConfig:
        if self.arch == "encoder_decoder" and self.encoder_layers < 1:
            raise ValueError("encoder_layers must be at least 1 (0 is for arch decoder_only)")
        if self.arch == "decoder_only" and self.encoder_layers:
            raise ValueError(
                f"arch decoder_only has no encoder (encoder_layers is {self.encoder_layers}): set "
                "encoder_layers: 0 or a decoder-only size (tiny_decoder_only, small_decoder_only, "
                "small_decoder_only_layers)"
            )
        return self


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The devices ``train.device`` and ``mtkit translate --device`` accept."""


class TrainConfig(Section):
    max_tokens: int = Field(default=4096, ge=1)
    """Tokens per batch: batch size times the longest padded sentence (the larger side)."""
    update_freq: int = Field(default=1, ge=1)
    """Batches whose gradients are accumulated before each update."""
    max_steps: int = Field(default=100_000, ge=1)
    """Stop after this many updates."""
    max_epochs: int | None = Field(default=None, ge=1)
    """Stop after this many passes over the data."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop taking updates after this much wall-clock time, validations during the run included
    (a budget for fixed-time comparisons); the final validation and checkpoint come after."""
    lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate."""
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    """Learning-rate schedule after linear warm-up."""
    warmup_steps: int = Field(default=4000, ge=0)
    """Linear warm-up updates."""
    min_lr: float = Field(default=0.0, ge=0)
    """Floor of the cosine schedule and of the cool-down."""
    cooldown: float = Field(default=0.0, ge=0, le=1)
    """Fraction of the run at its end over which the learning rate falls linearly to min_lr
    (0: none). The end is max_steps, or the max_minutes budget when that comes first: a
    time-bounded run cools down by wall-clock time and finishes annealed."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    """Label smoothing of the cross-entropy."""
    subword_alpha: float = Field(default=0.0, ge=0)
    """Subword regularisation (0: off): each epoch sees the training text in new
    segmentations, drawn by SentencePiece from the text prepare stored. For a unigram
    tokenizer, the smoothing of the sampling distribution (smaller is more random: 0.5 resegments
    about two sentences in five on Multi30k); for BPE, the BPE-dropout rate (0.1 is usual).
    Validation and translation always use the best segmentation."""
    subword_nbest: int = -1
    """Unigram subword regularisation: sample among the ``subword_nbest`` best segmentations
    (-1: all of them, from the lattice; must be -1 or above 1)."""
    clip_norm: float = Field(default=1.0, ge=0)
    """Clip the gradient norm to this (0 turns clipping off)."""
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    """Keep an exponential moving average of the weights with this decay per update (e.g.
    0.999; 0: off). Validation, checkpoints and so translation use the average."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 on CUDA; on CPUs bf16 where the CPU has
    native bf16 (AVX512-BF16, AMX, Arm BF16), else fp32."""
    compile: bool = False
    """Compile the model with torch.compile: about 20% more tokens a second on an H100, slower
    than eager on CPU (docs/benchmarks.md)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch (default: torch's choice)."""
    log_every: int = Field(default=100, ge=1)
    """Updates between log lines."""
    valid_every: int = Field(default=1000, ge=1)
    """Updates between validations (and checkpoints)."""
    valid_bleu: bool = True
    """Decode the validation set and compute BLEU/chrF at each validation."""
    valid_bleu_from: float = Field(default=0.0, ge=0, le=1)
    """Decode for BLEU/chrF only at validations once this fraction of the run is done (counted
    as the cool-down counts it: max_steps, or the max_minutes clock when nearer); earlier
    validations compute the loss only. Decoding is most of a validation's time, and within a
    max_minutes budget that time buys no updates; early checkpoints are never the chosen one
    when the run cools down. The final validation always decodes. 0: every validation."""
    valid_max_sentences: int | None = Field(default=None, ge=1)
    """Decode at most this many validation sentences for BLEU/chrF (default: all; loss uses
    all). A subset makes selection noisier: see docs/selection.md."""
    best_metric: Literal["bleu", "chrf", "loss"] = "chrf"
    """Metric that selects the best checkpoint, drives early stopping and picks the pipeline's
    final model. chrF on the whole validation set tells checkpoints apart better than BLEU on
    it or on a subset (its differences between checkpoints are larger against its resampling
    noise: docs/selection.md); loss is steadier still but prefers earlier checkpoints than
    BLEU and chrF do once the model grows overconfident."""
    keep_last: int = Field(default=3, ge=1)
    """Step checkpoints kept besides best and last."""
    average_last: int = Field(default=3, ge=0)
    """The pipeline's final model is the best of ``best``, ``last`` and the average of the
    newest K step checkpoints kept (at most keep_last) on the whole validation set by
    best_metric (0 or 1: no average; the choice is then between best and last)."""
    patience: int | None = Field(default=None, ge=1)
    """Stop after this many validations without improvement."""
    max_nonfinite: int = Field(default=5, ge=1)
    """Stop with an error after this many non-finite losses in a row."""
    source_loss_weight: float = Field(default=0.0, ge=0)
    """model.arch=decoder_only with model.source_attention=causal: add this times the
    language-model loss on the source tokens (each predicted from the ones before it) to the
    translation loss (0: target tokens only). Validation loss and perplexity stay target-only."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_NAME.fullmatch(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {json.dumps(value)}")
        return value

    @field_validator("subword_nbest")
    @classmethod
    def _sampling_nbest(cls, value: int) -> int:
        if value == 0 or value == 1 or value < -1:
            raise ValueError(f"expected -1 (all segmentations) or a number above 1, got {value}")
        return value


class DecodeConfig(Section):
    beam: int = Field(default=5, ge=1)
    """Beam size; 1 is greedy search."""
    lenpen: float = Field(default=1.0, ge=0)
    """Length-penalty alpha: a hypothesis's log-probability is divided by a penalty that grows
    with its length (see length_penalty_form); 0 ranks by log-probability alone."""
    length_penalty_form: Literal["length", "gnmt"] = "length"
    """length: divide by length ** lenpen (fairseq, CTranslate2, Marian, Hugging Face); gnmt:
    by ((5 + length) / 6) ** lenpen (Wu et al., 2016; mtkit 0.1.0 used it; PyTorch backend only).
    length counts the output tokens and the EOS, prefix tokens included."""
    max_len_a: float = Field(default=1.5, ge=0)
    """Maximum output length is max_len_a * source_length + max_len_b."""
    max_len_b: int = Field(default=10, ge=0)
    """See max_len_a."""
    min_len: int = Field(default=1, ge=0)
    """Minimum output length (EOS is blocked before it)."""
    nbest: int = Field(default=1, ge=1)
    """Hypotheses returned per sentence; at most the beam size."""
    batch_tokens: int = Field(default=4096, ge=1)
    """Source tokens per translation batch."""
    batch_sentences: int = Field(default=64, ge=1)
    """Most sentences per translation batch (fairseq's ``--batch-size``, CTranslate2's
    ``max_batch_size``): short sentences would otherwise fill one huge batch, which beam
    search runs no faster per sentence and which leaves concurrent workers idle."""
    sampling: bool = False
    """Sample instead of searching (uses temperature, top_k, top_p)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature."""
    top_k: int = Field(default=0, ge=0)
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Sample from the smallest set of tokens whose probability reaches p."""
    allow_unk: bool = False
    """Let search produce the unknown token (shown as `` ⁇ `` in the text). Off, as in Marian:
    the next best token is taken instead (a forced prefix may still hold one)."""
    long_lines: Literal["split", "truncate"] = "split"
    """A line longer than the model accepts: split, cut into pieces at sentence boundaries (then
    between words, then between characters) that are translated apart and joined into one
    output line; truncate, its end dropped (what mtkit did before 0.3). Either way a warning
    names the line."""
    backend: Literal["auto", "torch", "ctranslate2"] = "auto"
    """What runs the search in ``mtkit translate``, the pipeline's test translation and ``mtkit
    serve``: torch, mtkit's own search; ctranslate2, the model converted to CTranslate2 on first
    use (stored beside the checkpoint); auto, ctranslate2 when it is installed and can honour
    the model and every decode setting, else torch (one line on stderr says which and why).
    Validation during training always uses torch."""
    compute_type: Literal[
        "auto", "float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16"
    ] = "auto"
    """The precision of the weights and of the computation: CTranslate2 runs every value here,
    the PyTorch backend float32, bfloat16 and float16. auto: for CTranslate2, int8 on a CPU
    (float16 on a GPU); for PyTorch, bfloat16 on a CPU that multiplies it in hardware (AMX,
    AVX512-BF16); each only when it keeps validation BLEU within 0.3 of float32, measured once
    per model and stored beside it (compute_type.json, torch_compute_type.json), else float32."""

    @model_validator(mode="after")
    def _nbest_fits(self) -> DecodeConfig:
        if not self.sampling and self.nbest > self.beam:
            raise ValueError(f"nbest ({self.nbest}) cannot exceed beam ({self.beam})")
        return self


class PretrainedConfig(Section):
    huggingface: str | None = None
    """A Hugging Face translation model to start from: a hub id (``Helsinki-NLP/opus-mt-en-de``,
    needs internet) or a local ``save_pretrained`` directory. The pipeline imports it into
    ``{experiment.dir}/pretrained`` (``mtkit import huggingface``)."""
    revision: str | None = None
    """huggingface: the hub revision (branch, tag or commit; default: the main branch)."""
    run: Path | None = None
    """An mtkit run (or checkpoint) directory to start from instead: an imported model or a model
    mtkit trained."""
    freeze: list[Literal["embeddings", "encoder", "decoder"]] = Field(default_factory=list)
    """Parts whose weights fine-tuning leaves as they are: embeddings (token and position tables,
    with the output projection tied to them), encoder, decoder (its layers)."""

    @model_validator(mode="after")
    def _one_source(self) -> PretrainedConfig:
        if self.huggingface is not None and self.run is not None:
            raise ValueError("give huggingface or run, not both")
        if self.revision is not None and self.huggingface is None:
            raise ValueError("revision needs huggingface")
        if self.freeze and not self.given:
            raise ValueError("freeze needs a pretrained model (huggingface or run) to keep parts of")
        return self

    @property
    def given(self) -> bool:
        """Whether the experiment starts from a pretrained model (fine-tuning)."""
        return self.huggingface is not None or self.run is not None


def tag_problem(tag: str | None) -> str | None:
    """What is wrong with a back-translation tag (it must be one word), or None."""
    if tag is not None and (len(tag.split()) != 1 or tag != tag.strip()):
        return f"must be one word without spaces (got {tag!r})"
    return None


class BacktranslationConfig(Section):
    model: Path | None = None
    """A reverse run (target -> source language: a de->en run for an en->de experiment) whose
    translations of ``monolingual`` become synthetic training pairs: the pipeline's
    ``backtranslate`` stage (``mtkit backtranslate``; docs/backtranslation.md). None: no stage."""
    monolingual: Path | None = None
    """Target-language text, one sentence a line (plain or .gz)."""
    method: Literal["beam", "sampling", "noised-beam"] = "beam"
    """beam: the reverse run's beam search; sampling: one sample a line (Edunov et al. 2018),
    with ``top_k``/``top_p``/``temperature``; noised-beam: beam output with deleted, blanked and
    swapped words."""
    top_k: int | None = Field(default=None, ge=0)
    """sampling: draw from the k most likely tokens (0: all; None: the reverse run's decode.top_k)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """sampling: draw from the smallest set of tokens with this much probability (None: the run's)."""
    temperature: float | None = Field(default=None, gt=0)
    """sampling: divide the logits by this (None: the reverse run's decode.temperature)."""
    tag: str | None = None
    """A token put before every synthetic source (``<BT>``: Caswell et al. 2019's tagged
    back-translation); it is added to ``tokenizer.user_symbols``."""
    max_ratio: float = Field(default=3.0, gt=0)
    """Drop a synthetic pair whose longer side has more than this many times the words of the other."""
    weight: float = Field(default=1.0, gt=0)
    """How many times an epoch counts the synthetic pairs (as ``data.train.N.weight``): 0.5 takes
    half of them each epoch, 2 each twice."""

    @model_validator(mode="after")
    def _both_or_neither(self) -> BacktranslationConfig:
        if (self.model is None) != (self.monolingual is None):
            raise ValueError("model and monolingual go together (the reverse run and the text it translates)")
        problem = tag_problem(self.tag)
        if problem:
            raise ValueError(f"tag {problem}")
        return self


class Config(Section):
    """A whole experiment."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    """Where outputs go and how randomness is seeded."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Corpora and cleaning."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """SentencePiece training."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig.model_validate({}))
    """The Transformer: encoder-decoder or decoder-only."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, validation and checkpoints."""
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    """Search settings for validation and translation."""
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig)
    """Fine-tuning: start from a released or earlier model instead of training from scratch. Its
    tokenizer replaces tokenizer training, and its model description replaces ``model`` (where
    ``model`` may still set the dropouts)."""
    backtranslation: BacktranslationConfig = Field(default_factory=BacktranslationConfig)
    """The pipeline's back-translation stage: synthetic pairs from target-language text, added
    to ``data.train``."""

    @model_validator(mode="after")
    def _source_loss_fits(self) -> Config:
        model = self.model
        if self.train.source_loss_weight > 0:
            # A bidirectional source sees the token it would predict; an encoder does not predict.
            if model.arch != "decoder_only" or model.source_attention != "causal":
                raise ValueError("train.source_loss_weight > 0 needs model.arch decoder_only with "
                                 "model.source_attention causal")
            if not (self.tokenizer.joint and model.share_embeddings):
                raise ValueError("train.source_loss_weight > 0 needs one vocabulary (tokenizer.joint and "
                                 "model.share_embeddings true): the source is predicted through the output layer")
        return self

    _model_keys: frozenset[str] = PrivateAttr(default=frozenset())

    # Fine-tuning takes the pretrained model's description and lets ``model`` set only the
    # dropouts; telling a key the user wrote from one a size preset filled needs the raw input.
    @model_validator(mode="wrap")
    @classmethod
    def _remember_model_keys(cls, data: Any, handler: Any) -> Config:
        config = handler(data)
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict):
            config._model_keys = frozenset(key for key, value in model.items() if value is not None)
        return config

    @property
    def model_keys_given(self) -> frozenset[str]:
        """The ``model`` keys the config's input gave (not those filled from ``size`` or defaults)."""
        return self._model_keys

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready data (paths as strings)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key.path=value``
    overrides. Raises ConfigError listing every problem."""
    data: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    return validate_config(apply_overrides(data, overrides or []))



def resolve_decode(
    stored: DecodeConfig, config: str | Path | None, overrides: list[str] | None, flags: dict[str, Any]
) -> DecodeConfig:
    """The decode settings of ``mtkit translate``, each source overriding the one before:
    ``stored`` (the checkpoint's), the ``decode`` section of the YAML file ``config``, the
    ``decode.KEY=VALUE`` ``overrides``, then the ``flags`` that are not None. ConfigError
    lists every problem; an override outside ``decode`` is an MtkitError."""
    merged = stored.model_dump()
    if config is not None:
        merged.update(load_config(config).decode.model_dump(exclude_unset=True))
    data = apply_overrides({"decode": merged}, overrides or [])
    others = sorted(set(data) - {"decode"})
    if others:
        raise MtkitError(f"--set: translate takes only decode.* keys (got {', '.join(others)})")
    if isinstance(data["decode"], dict):
        data["decode"].update({key: value for key, value in flags.items() if value is not None})
    return validate_config(data).decode

def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in _chosen_branch(err.errors())]) from None


def _chosen_branch(errors: list[Any]) -> list[Any]:
    """The errors of a ``corpus | list of corpora`` key (``data.valid``) less the branch the
    input is not: a mapping is not reported as "expected a list", nor a list as "expected a
    mapping" (unless nothing else is wrong)."""
    def other_branch(error: Mapping[str, Any]) -> bool:
        last = str(error["loc"][-1]) if error["loc"] else ""
        return (error["type"] == "list_type" and last.startswith("list[")) or (
            error["type"] in ("model_type", "model_attributes_type", "dict_type") and last.startswith("function-"))

    kept = [error for error in errors if not other_branch(error)]
    return kept or errors


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config: {err.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: config is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
        aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise ConfigError([f"{path}: too many YAML aliases ({aliases}); refusing to expand it"])
        data = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: config is not UTF-8 (byte {err.start})"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: YAML nested too deeply"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}:{where} invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a config must be a mapping of sections, got {type(data).__name__}"])
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to raw config data in place (for commands that
    start from a stored config); ConfigError lists every malformed one."""
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in raw config data; a number indexes a list (``data.train.0.limit``)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected key.path=value")
    parts = key.strip().split(".")
    node: Any = data
    step: str | int = ""  # the key (or list index) of the last part
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i])
        step = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"--set {item!r}: {where} has no item {part}")
            step = int(part)
        elif not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {where} is not a section")
        if last:
            break
        if isinstance(node, dict) and node.get(step) is None:
            node[step] = {}
        node = node[step]
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node[step] = parsed


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "path": "a path",
    "tuple": "a list",
}


def _describe(error: Mapping[str, Any]) -> str:
    """One line for one pydantic error: ``train.lr: expected a number, got "fast"``."""
    # Keys come from user files: show odd ones quoted, so a message stays on one line.
    loc = [str(p) if str(p).isprintable() else json.dumps(str(p)) for p in error["loc"]]
    loc = [p for p in loc if not p.startswith(("function-", "list["))]
    kind = error["type"]
    key = ".".join(loc) or "config"
    value = error.get("input")
    if kind == "extra_forbidden":
        hint = _nearest(loc)
        return f"{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
    if kind == "missing":
        return f"{key}: required"
    for prefix, word in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") and ("parsing" in kind or "type" in kind):
            return f"{key}: expected {word}, got {_show(value)}"
    if kind == "literal_error":
        return f"{key}: expected {error['ctx']['expected']}, got {_show(value)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" + ("" if kind == "value_error" else f", got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nearest(loc: list[str]) -> str | None:
    """The valid key closest to the unknown last element of ``loc``."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if part.isdigit() or model is None:
            continue
        field = model.model_fields.get(part)
        model = _section_type(field.annotation) if field else None
    if model is None:
        return None
    matches = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _choices(annotation: Any) -> list[str]:
    """The values a ``Literal`` annotation (or an optional one) allows; none for other types."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    return [value for arg in get_args(annotation) for value in _choices(arg)]


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every field, for ``mtkit config show --doc``; the doc of a
    key with a fixed set of values starts with them, as in ``[pre|post]``."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        doc = " ".join((field.description or "").split())
        choices = _choices(field.annotation)
        if choices:
            doc = f"[{'|'.join(choices)}] {doc}"
        sub = _section_type(field.annotation)
        if sub is not None:
            rows.append((path, "", doc))
            rows.extend(describe_fields(sub, path + "."))
            continue
        # A required field here is one filled before validation (the model sizes): no default.
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        rows.append((path, json.dumps(default, default=str), doc))
    return rows


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config atomically."""
    from mtkit.fileio import atomic_write_text

    atomic_write_text(path, config.to_yaml())
