"""``mtkit tokenizer train|encode|decode``: SentencePiece for an experiment, and for the shell."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mtkit.cli.options import ConfigOption, OptionalConfigOption, SetOption
from mtkit.errors import MtkitError

if TYPE_CHECKING:
    from mtkit.tokenizer import Tokenizer

app = typer.Typer(no_args_is_help=True)


class SideChoice(str, Enum):
    src = "src"
    tgt = "tgt"


ModelOption = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="A tokenizer directory (instead of -c).", show_default=False),
]
SideOption = Annotated[SideChoice, typer.Option("--side", help="Which language's model to use.")]
IdsOption = Annotated[bool, typer.Option("--ids", help="Ids instead of pieces.")]


@app.command("train")
def train(config: ConfigOption, overrides: SetOption = None) -> None:
    """Train SentencePiece on data.train into {experiment.dir}/tokenizer/.

    When fine-tuning (a pretrained section), copy the pretrained model's tokenizer there instead."""
    from mtkit.config import load_config
    from mtkit.data import train_tokenizer
    from mtkit.rundir import exclusive
    from mtkit.tokenizer import tokenizer_dir

    cfg = load_config(config, overrides)
    with exclusive(cfg.experiment.dir):
        tokenizers = train_tokenizer(cfg)
    sizes = (
        f"{tokenizers.src.vocab_size}"
        if tokenizers.joint
        else f"{tokenizers.src.vocab_size}/{tokenizers.tgt.vocab_size}"
    )
    kind = "joint" if tokenizers.joint else "separate"
    if cfg.pretrained.given:
        source = cfg.pretrained.run or cfg.pretrained.huggingface
        typer.echo(f"tokenizer: the pretrained model's ({source}), vocabulary {sizes}, copied to {tokenizer_dir(cfg)}",
                   err=True)
        return
    typer.echo(f"tokenizer: {kind} {cfg.tokenizer.type}, vocabulary {sizes}, written to {tokenizer_dir(cfg)}", err=True)


@app.command("encode")
def encode(
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    model: ModelOption = None,
    side: SideOption = SideChoice.src,
    ids: IdsOption = False,
) -> None:
    """Encode stdin line by line: pieces (or ids) separated by spaces, one line per input line.

    Input is normalised as `mtkit prepare` normalises corpora."""
    from mtkit.corpus import normalize
    from mtkit.fileio import STDIN, read_lines

    tokenizer = _load(config, overrides, model, side)
    for line in read_lines(STDIN, hint=""):
        text = normalize([line])
        tokens = tokenizer.encode(text)[0] if ids else tokenizer.encode_pieces(text)[0]
        _write(" ".join(map(str, tokens)))


@app.command("decode")
def decode(
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    model: ModelOption = None,
    side: SideOption = SideChoice.tgt,
    ids: IdsOption = False,
) -> None:
    """Decode stdin line by line: space-separated pieces (or ids with --ids) to text."""
    from mtkit.fileio import STDIN, read_lines

    tokenizer = _load(config, overrides, model, side)
    for number, line in enumerate(read_lines(STDIN, hint=""), start=1):
        tokens = line.split()
        if not ids:
            _write(tokenizer.decode_pieces([tokens])[0])
            continue
        try:
            values = [int(t) for t in tokens]
        except ValueError:
            raise MtkitError(f"<stdin>:{number}: expected space-separated integer ids") from None
        bad = [v for v in values if not 0 <= v < tokenizer.vocab_size]
        if bad:
            raise MtkitError(f"<stdin>:{number}: id {bad[0]} outside the vocabulary (0..{tokenizer.vocab_size - 1})")
        _write(tokenizer.decode([values])[0])


def _load(config: Path | None, overrides: list[str] | None, model: Path | None, side: SideChoice) -> Tokenizer:
    from mtkit.config import load_config
    from mtkit.tokenizer import Tokenizers, tokenizer_dir

    if (config is None) == (model is None):
        raise MtkitError("give either -c CONFIG or -m TOKENIZER_DIR")
    directory = model if model is not None else tokenizer_dir(load_config(config, overrides))
    tokenizers = Tokenizers.load(directory)
    return tokenizers.src if side == SideChoice.src else tokenizers.tgt


def _write(line: str) -> None:
    # Flushed per line so that `mtkit tokenizer encode` works as an interactive filter.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
