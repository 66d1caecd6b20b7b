"""``mtkit compare RUN_OR_HYP... [--test SRC REF]...``: systems side by side, with error bars.

Systems are run directories (or checkpoints inside them), translated with their own decode
settings, or hypothesis files. Without ``--test`` the runs' shared test split is used. The
report is markdown, or JSON with ``--json``; ``-o FILE`` writes it atomically. What each
figure means and how it is measured: ``mtkit.compare`` and docs/compare.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from mtkit.compare import DEFAULT_BUCKETS, DEFAULT_SPEED_BEAM, DEFAULT_SPEED_SENTENCES
from mtkit.errors import MtkitError


class CompareCommand(TyperCommand):
    """Lets ``--test`` take two values per use (SRC REF): Typer has no annotation for a
    repeated pair, so the option is declared once-valued and given two values here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.name == "test":
                param.nargs = 2


def _pair(values: tuple[str, str]) -> tuple[Path, Path]:
    return Path(values[0]), Path(values[1])


def compare(
    systems: Annotated[
        list[str],
        typer.Argument(metavar="RUN_OR_HYP", show_default=False,
                       help="Run directories (each its final, else best, else last checkpoint), checkpoint "
                            "directories (e.g. RUN/checkpoints/last) and hypothesis files; "
                            "the first is the baseline. With several --test sets, a hypothesis file's name holds "
                            "{test}, replaced by each set's name."),
    ],
    test: Annotated[
        list[Any] | None,
        typer.Option("--test", metavar="SRC REF", parser=_pair, show_default=False,
                     help="A test set: source and reference files, plain or .gz (repeatable; its name is the "
                          "source file's without language and .gz). Default: the runs' shared test split."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Write JSON instead of markdown.")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file (atomic).", show_default=False)
    ] = None,
    lang: Annotated[
        str | None,
        typer.Option("--lang", "-l", help="Target language for BLEU's tokenizer (default: the runs').",
                     show_default=False),
    ] = None,
    tokenize: Annotated[
        str | None, typer.Option("--tokenize", "-t", help="BLEU tokenizer (13a, intl, zh, ...).", show_default=False)
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Bootstrap resamples.")] = 1000,
    buckets: Annotated[
        str, typer.Option("--buckets", help="Upper edges of the source-length buckets, in words.")
    ] = ",".join(map(str, DEFAULT_BUCKETS)),
    speed_sentences: Annotated[
        int,
        typer.Option("--speed-sentences", min=0,
                     help="Test sentences timed at batch 32 (a quarter of them at batch 1); 0: no timing."),
    ] = DEFAULT_SPEED_SENTENCES,
    speed_beam: Annotated[
        int, typer.Option("--speed-beam", min=1, help="Beam size of the timing.")
    ] = DEFAULT_SPEED_BEAM,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch.", show_default=False)
    ] = None,
    source_lang: Annotated[str | None, typer.Option(
        "--source-lang", help="A multilingual run's source language, as its code (eng_Latn, en, en_XX).",
        show_default=False)] = None,
    target_lang: Annotated[str | None, typer.Option(
        "--target-lang", help="A multilingual run's target language (deu_Latn, de, de_DE; Marian: deu); also "
        "BLEU's language unless --lang.", show_default=False)] = None,
) -> None:
    """Compare translation systems: BLEU and chrF with paired bootstrap tests, size, speed, memory."""
    import json

    import torch

    from mtkit.compare import Options
    from mtkit.compare import compare as run_comparison
    from mtkit.fileio import atomic_write_text
    from mtkit.runtime import inference_device

    try:
        edges = [int(edge) for edge in buckets.split(",")]
    except ValueError:
        raise MtkitError(f"--buckets {buckets}: expected comma-separated word counts, e.g. 10,20,30") from None
    if threads is not None:
        torch.set_num_threads(threads)
    options = Options(lang=lang, tokenize=tokenize, samples=samples, buckets=edges, device=inference_device(device),
                      speed_sentences=speed_sentences, speed_beam=speed_beam, src_lang=source_lang,
                      tgt_lang=target_lang)
    report = run_comparison(systems, test or [], options, log=lambda line: typer.echo(line, err=True))
    text = json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n" if as_json else report.markdown()
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        typer.echo(f"compare: report written to {output}", err=True)
