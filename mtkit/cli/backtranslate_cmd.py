"""``mtkit backtranslate``: target-side monolingual text through a reverse model into a
synthetic parallel corpus (``mtkit.backtranslate``; docs/backtranslation.md).

Decode settings come as for ``mtkit translate``: the checkpoint's, then ``-c CONFIG``'s decode
section, then ``--set decode.KEY=VALUE``, then the flags (``mtkit.config.resolve_decode``);
``--method`` then decides between search and sampling.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mtkit.cli.options import (
    BackendOption,
    BatchSentencesOption,
    BatchTokensOption,
    BeamOption,
    ComputeTypeOption,
    LengthPenaltyFormOption,
    LenpenOption,
    LongLinesOption,
    MaxLenAOption,
    MaxLenBOption,
    MinLenOption,
    OptionalConfigOption,
    SetOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
)
from mtkit.cli.options import flag as _flag
from mtkit.errors import MtkitError


class Method(str, Enum):
    beam = "beam"
    sampling = "sampling"
    noised_beam = "noised-beam"


def backtranslate(
    model: Annotated[Path, _flag(
        "--model", "-m", help="The reverse run (target->source; its final, else best, else last checkpoint) or "
        "checkpoint directory.")],
    input: Annotated[Path, _flag("--input", "-i", help="Target-side monolingual text (plain or .gz).")],
    output: Annotated[Path, _flag(
        "--output", "-o", help="Output directory: synthetic.SRC, synthetic.TGT and report.json once complete.")],
    method: Annotated[Method, typer.Option(
        "--method", help="beam: beam search; sampling: one sample per line (--temperature, --top-k, --top-p); "
        "noised-beam: beam search, then words of the output deleted, replaced and shuffled.")] = Method.beam,
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    beam: BeamOption = None,
    lenpen: LenpenOption = None,
    length_penalty_form: LengthPenaltyFormOption = None,
    max_len_a: MaxLenAOption = None,
    max_len_b: MaxLenBOption = None,
    min_len: MinLenOption = None,
    batch_tokens: BatchTokensOption = None,
    batch_sentences: BatchSentencesOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    backend: BackendOption = None,
    compute_type: ComputeTypeOption = None,
    long_lines: LongLinesOption = None,
    seed: Annotated[int | None, _flag(
        "--seed", help="Seeds sampling and noise, chunk by chunk (default: the run's experiment.seed).")] = None,
    delete_prob: Annotated[float, typer.Option(
        "--delete-prob", help="noised-beam: probability of deleting each word.")] = 0.1,
    replace_prob: Annotated[float, typer.Option(
        "--replace-prob", help="noised-beam: probability of replacing each word by --filler.")] = 0.1,
    swap_distance: Annotated[int, typer.Option(
        "--swap-distance", help="noised-beam: shuffle words, none moving further than this (0: no shuffle).")] = 3,
    filler: Annotated[str, typer.Option("--filler", help="noised-beam: the word that replaces words.")] = "<blank>",
    max_ratio: Annotated[float, typer.Option(
        "--max-ratio", help="Drop pairs whose longer side has more than this many times the words of the shorter.")
    ] = 3.0,
    max_words: Annotated[int | None, _flag(
        "--max-words", help="Drop pairs with more words than this on either side (default: no limit).")] = None,
    tag: Annotated[str | None, _flag(
        "--tag", help="Prepend this word and a space to every synthetic source line (tagged back-translation), "
        "e.g. '<BT>'; list it in the forward model's tokenizer.user_symbols.")] = None,
    source_lang: Annotated[str | None, _flag(
        "--source-lang", help="A multilingual reverse model's source language: the monolingual text's.")] = None,
    target_lang: Annotated[str | None, _flag(
        "--target-lang", help="A multilingual reverse model's target language: the synthetic source's.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[int | None, _flag("--threads", help="CPU threads (default: torch's).")] = None,
    chunk_lines: Annotated[int, typer.Option(
        "--chunk-lines", min=1, help="Lines translated and saved at a time; a killed run, started again with the "
        "same command, continues after the last saved chunk.")] = 5000,
    restart: Annotated[bool, typer.Option(
        "--restart", help="Start over, dropping what OUTPUT holds of an earlier back-translation.")] = False,
) -> None:
    """Back-translate target-side monolingual text into a synthetic parallel corpus.

    Translates each line of INPUT with the reverse model, drops empty outputs, copies of the input and pairs of
    unlikely length ratio, and writes OUTPUT/synthetic.SRC and OUTPUT/synthetic.TGT (the reverse run's data.tgt_lang
    and data.src_lang) and OUTPUT/report.json, which counts each line kept or dropped and why. List the two files
    under data.train (format: text) to train the forward model on them.
    """
    import torch

    from mtkit.backtranslate import Filters, Noise, Settings
    from mtkit.backtranslate import backtranslate as run_backtranslation
    from mtkit.checkpoint import load_for_inference
    from mtkit.config import resolve_decode
    from mtkit.fileio import STDIN, open_binary
    from mtkit.progress import LineProgress
    from mtkit.runtime import inference_device

    settings = Settings(method=method.value, noise=Noise(delete_prob, replace_prob, swap_distance, filler),
                        filters=Filters(max_ratio, max_words), tag=tag, chunk_lines=chunk_lines)
    settings.check()
    flags = dict(beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len,
                 batch_tokens=batch_tokens, batch_sentences=batch_sentences, temperature=temperature, top_k=top_k,
                 top_p=top_p, length_penalty_form=length_penalty_form.value if length_penalty_form else None,
                 backend=backend.value if backend else None, compute_type=compute_type,
                 long_lines=long_lines.value if long_lines else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if str(input) == STDIN:
        raise MtkitError("--input: name a file (stdin cannot be resumed)")
    open_binary(input).close()  # a wrong path fails before the model loads
    device = inference_device(device)
    loaded = load_for_inference(model, device=device)
    decode = resolve_decode(loaded.config.decode, config, overrides, flags)
    settings = dataclasses.replace(settings, seed=loaded.config.experiment.seed if seed is None else seed)
    with LineProgress() as progress:
        report = run_backtranslation(loaded, input, output, settings, decode, device=device, threads=threads,
                                     restart=restart, src_lang=source_lang, tgt_lang=target_lang, say=_say,
                                     warn=_warn, on_chunk=progress.update)
        progress.done(report["lines_read"])
    dropped = ", ".join(f"{count} {reason}" for reason, count in report["dropped"].items() if count)
    _say(f"kept {report['kept']} of {report['lines_read']} lines (dropped: {dropped or 'none'}); "
         f"{output}/{report['files']['src']}, {output}/{report['files']['tgt']}")


def _warn(message: str) -> None:
    typer.echo(f"mtkit: warning: {message}", err=True)


def _say(message: str) -> None:
    typer.echo(f"mtkit: {message}", err=True)
