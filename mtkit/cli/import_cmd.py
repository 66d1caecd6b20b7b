"""``mtkit import``: bring a released model in as an mtkit run.

    mtkit import huggingface SRC -o RUN [--revision REV] [--source-lang L] [--target-lang L] [--prompt T] [--force]

SRC is a ``save_pretrained`` directory or a Hugging Face hub id (downloaded; needs internet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("huggingface")
def huggingface(
    source: Annotated[str, typer.Argument(metavar="SRC", help="A save_pretrained directory or a hub id "
                                                              "(Helsinki-NLP/opus-mt-en-de).")],
    out: Annotated[Path, typer.Option("--output", "-o", metavar="RUN", help="The run directory to write.")],
    revision: Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.",
                                                 show_default=False)] = None,
    source_lang: Annotated[str | None, typer.Option(
        "--source-lang", help="A multilingual model's default source language (its code).", show_default=False)] = None,
    target_lang: Annotated[str | None, typer.Option(
        "--target-lang", help="A multilingual model's default target language (its code).", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="A language model's prompt template: {source} is the text, {src_lang}/{tgt_lang} the "
        "--source-lang/--target-lang names (default: 'Translate {src_lang} to {tgt_lang}:\\n{source}\\n').",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace RUN if it exists.")] = False,
) -> None:
    """Import a transformers translation model (Marian/opus-mt, M2M100/NLLB, mBART-50, T5/mT5) or a
    Llama-layout language model (Llama, Mistral, Qwen2; translating by continuing a prompt) as a run every
    mtkit command takes: translate, serve, compare, export, fine-tuning."""
    from mtkit.huggingface import import_huggingface

    import_huggingface(source, out, revision=revision, force=force, src_lang=source_lang, tgt_lang=target_lang,
                       prompt=_unescape(prompt), log=lambda line: typer.echo(line, err=True))


def _unescape(prompt: str | None) -> str | None:
    """A template as typed in a shell: ``\\n`` and ``\\t`` stand for a newline and a tab."""
    return None if prompt is None else prompt.replace("\\n", "\n").replace("\\t", "\t")
