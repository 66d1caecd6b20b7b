"""``mtkit export``: write a trained model in another runtime's format.

    mtkit export huggingface RUN_DIR OUT_DIR [--sample FILE] [--target-lang CODE] [--force]
    mtkit export ctranslate2 RUN_DIR OUT_DIR [--quantization int8] [--sample FILE] [--force]

RUN_DIR is a run directory (its final, else best, else last checkpoint) or a checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from mtkit.engines.ctranslate2 import Parity

app = typer.Typer(no_args_is_help=True)

RunArg = Annotated[Path, typer.Argument(
    metavar="RUN_DIR", help="Run directory (its final, else best, else last checkpoint) or checkpoint directory.")]
OutArg = Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output directory (written whole, atomically).")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")]
SampleOption = Annotated[Path | None, typer.Option(
    help="Source sentences for the parity check (default: the run's prepared valid split, else a few "
    "built-in English sentences).")]
SampleLinesOption = Annotated[int, typer.Option(min=0, help="Sentences to compare (0 skips the check).")]


@app.command("huggingface")
def huggingface(
    run_dir: RunArg,
    out_dir: OutArg,
    sample: SampleOption = None,
    sample_lines: SampleLinesOption = 20,
    source_lang: Annotated[str | None, typer.Option(
        "--source-lang", help="A multilingual model's source language for the parity check.")] = None,
    target_lang: Annotated[str | None, typer.Option(
        "--target-lang", help="A multilingual model's target language for the parity check.")] = None,
    force: ForceOption = False,
) -> None:
    """Write a transformers model directory (MarianMTModel, BART, mBART or Blenderbot, whichever
    computes what the model computes) with a MarianTokenizer and mtkit's decode settings, then
    check parity: the share of sample sentences that mtkit and transformers translate identically."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.export import HuggingFaceExporter, export, hf_parity, huggingface_class

    loaded = load_for_inference(run_dir)
    exporter = HuggingFaceExporter()
    export(exporter, loaded, out_dir, force=force)
    model_class = huggingface_class(loaded.config.model).model_class
    typer.echo(f"exported {run_dir} -> {out_dir} (load with transformers.{model_class}.from_pretrained; "
               "trust_remote_code=True adds mtkit's per-sentence length limit to generate)")
    for note in exporter.notes(loaded):
        typer.echo(f"note: {note}")
    if sample_lines == 0:
        return
    lines, origin = _sample(run_dir, _holder(loaded.path), sample, sample_lines)
    _report(hf_parity(loaded, out_dir, lines, source_lang, target_lang), origin, "transformers")


@app.command("ctranslate2")
def ctranslate2(
    run_dir: RunArg,
    out_dir: OutArg,
    quantization: Annotated[
        str | None,
        typer.Option(help="Weight type: int8, int8_float32, int8_float16, int16, float16, bfloat16, float32."),
    ] = None,
    sample: SampleOption = None,
    sample_lines: SampleLinesOption = 20,
    force: ForceOption = False,
) -> None:
    """Write a CTranslate2 model directory, then check parity: the share of sample sentences
    that mtkit and CTranslate2 translate identically (greedy and beam)."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.engines.ctranslate2 import ct2_parity
    from mtkit.export import CTranslate2Exporter, export

    loaded = load_for_inference(run_dir)
    export(CTranslate2Exporter(quantization), loaded, out_dir, force=force)
    typer.echo(f"exported {run_dir} -> {out_dir} (weights: {quantization or 'float32'})")
    if sample_lines == 0:
        return
    lines, origin = _sample(run_dir, _holder(loaded.path), sample, sample_lines)
    _report(ct2_parity(loaded, out_dir, lines), origin, "ctranslate2")


def _holder(checkpoint: Path) -> Path | None:
    """The run directory that holds ``checkpoint`` (never the config's experiment.dir: a
    checkpoint is data), or None."""
    holder = checkpoint.resolve().parent
    return holder.parent if holder.name == "checkpoints" else None


def _report(parity: Parity, origin: str, runtime: str) -> None:
    typer.echo(
        f"parity on {parity.sentences} sentences from {origin}: greedy {parity.greedy_identical:.0%} identical, "
        f"beam {parity.beam} {parity.beam_identical:.0%} identical"
    )
    for source, ours, theirs in parity.differences:
        typer.echo(f"  {'src:':<14}{source}\n  {'mtkit:':<14}{ours}\n  {runtime + ':':<14}{theirs}")


def _sample(run_dir: Path, holder: Path | None, sample: Path | None, count: int) -> tuple[list[str], str]:
    """Up to ``count`` non-empty source lines and where they came from: ``sample``, else the
    prepared valid split of the run (``run_dir`` or ``holder``, the run directory that holds
    the checkpoint), else built-in sentences."""
    from itertools import islice

    from mtkit.engines.ctranslate2 import SAMPLE_SENTENCES
    from mtkit.fileio import read_lines

    if sample is not None:
        lines = [line for line in islice(read_lines(sample), count * 4) if line and line.strip()]
        return lines[:count], str(sample)
    for exp_dir in (run_dir, holder):
        if exp_dir is not None and (exp_dir / "data" / "valid.arrow").is_file():
            from mtkit.data import load_split

            split = load_split(exp_dir, "valid")
            return list(split.select(range(min(count, len(split))))["src"]), "the valid split"
    return SAMPLE_SENTENCES[:count], "built-in sentences"
