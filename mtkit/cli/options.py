"""Options shared by every command that reads a config."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment config (YAML).", show_default=False)
]
OptionalConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Experiment config (YAML).", show_default=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key: --set tokenizer.vocab_size=16000 (repeatable).",
        show_default=False,
    ),
]


# --------------------------------------------------------------------------- decode flags
# Those of every command that translates (translate, backtranslate): None keeps the configured value.


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    ctranslate2 = "ctranslate2"


class LengthPenaltyForm(str, Enum):
    length = "length"
    gnmt = "gnmt"


class LongLines(str, Enum):
    SPLIT = "split"  # upper case: str.split and friends are taken
    TRUNCATE = "truncate"


def flag(*names: str, help: str) -> Any:
    """An option without a shown default (None: keep the configured value)."""
    return typer.Option(*names, help=help, show_default=False)


BeamOption = Annotated[int | None, flag("--beam", help="Beam size (1: greedy).")]
LenpenOption = Annotated[float | None, flag("--lenpen", help="Length-penalty alpha.")]
LengthPenaltyFormOption = Annotated[LengthPenaltyForm | None, flag(
    "--length-penalty-form", help="length: divide by length ** alpha; gnmt: by ((5 + length) / 6) ** alpha.")]
MaxLenAOption = Annotated[float | None, flag("--max-len-a", help="Max output length = a * source length + b.")]
MaxLenBOption = Annotated[int | None, flag("--max-len-b", help="See --max-len-a.")]
MinLenOption = Annotated[int | None, flag("--min-len", help="Minimum output length in subwords.")]
BatchTokensOption = Annotated[int | None, flag("--batch-tokens", help="Source tokens per batch.")]
BatchSentencesOption = Annotated[int | None, flag("--batch-sentences", help="Most sentences per batch.")]
TemperatureOption = Annotated[float | None, flag("--temperature", help="Sampling temperature.")]
TopKOption = Annotated[int | None, flag("--top-k", help="Sample from the k most likely tokens (0: all).")]
TopPOption = Annotated[float | None, flag("--top-p", help="Nucleus sampling threshold.")]
BackendOption = Annotated[Backend | None, flag(
    "--backend", help="auto: CTranslate2 when it can honour every setting, else torch.")]
ComputeTypeOption = Annotated[str | None, flag(
    "--compute-type", help="Precision (decode.compute_type): auto, float32, bfloat16, float16; "
    "CTranslate2 also int8, int8_float32, int16, ...")]
LongLinesOption = Annotated[LongLines | None, flag(
    "--long-lines", help="A line longer than the model accepts: split it at sentence boundaries and join the "
    "translations (default), or truncate it.")]
