"""``mtkit translate``: translate text with a trained checkpoint, streaming in bounded memory.

Decoding settings: the checkpoint's, then ``-c CONFIG``'s decode section, then ``--set
decode.KEY=VALUE``, then the flags (``mtkit.config.resolve_decode``). The search runs in PyTorch
or CTranslate2 (``--backend``, ``mtkit.engines``); one line on stderr says which.
``decode.compute_type: auto`` checks a faster precision on the prepared validation split of the
run that holds the checkpoint, else on ``-c CONFIG``'s ``data.valid`` (never on the checkpoint's
own config: a checkpoint is data). One output line per input line, in order
(``mtkit.translate``): input is read as ``mtkit.fileio.read_lines`` reads it (split on
``\\n`` only, CRLF like LF, invalid UTF-8 replaced with U+FFFD and warned about),
``--chunk-lines`` lines at a time, each chunk translated, written and flushed, so
``mtkit translate ... | head`` stops early and quietly; ``-o FILE`` appears only when complete.
Input from a pipe that pauses for ``--flush-wait`` seconds, or typed at a terminal, is
translated as it arrives: the lines read so far form a chunk (``Translator.translate_stream``'s
``ready``), so each line's translation appears without waiting for the end of the input; a
file, or a pipe that keeps up, still gets full chunks.

Scale-out: ``torchrun --nproc_per_node N -m mtkit translate -m RUN -i FILE -o OUT`` starts N
processes that all read FILE; each translates every N-th line of each chunk (on GPU
``cuda:LOCAL_RANK``), and rank 0 gathers the chunk and writes it in order.
"""

from __future__ import annotations

import functools
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


class OutputFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"




def translate(
    model: Annotated[
        Path,
        _flag("--model", "-m",
              help="Run directory (its final, else best, else last checkpoint) or checkpoint directory."),
    ],
    input: Annotated[str, typer.Option("--input", "-i", help="Source text (plain or .gz), or - for stdin.")] = "-",
    output: Annotated[str, typer.Option("--output", "-o", help="Output file (atomic), or - for stdout.")] = "-",
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    beam: BeamOption = None,
    lenpen: LenpenOption = None,
    length_penalty_form: LengthPenaltyFormOption = None,
    max_len_a: MaxLenAOption = None,
    max_len_b: MaxLenBOption = None,
    min_len: MinLenOption = None,
    nbest: Annotated[int | None, _flag("--nbest", help="Hypotheses per line (needs --output-format jsonl).")] = None,
    batch_tokens: BatchTokensOption = None,
    batch_sentences: BatchSentencesOption = None,
    sampling: Annotated[bool | None, _flag("--sampling/--no-sampling", help="Sample instead of beam search.")] = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    backend: BackendOption = None,
    compute_type: ComputeTypeOption = None,
    long_lines: LongLinesOption = None,
    seed: Annotated[int | None, _flag("--seed", help="Sampling seed (default: experiment.seed).")] = None,
    prefix: Annotated[Path | None, _flag("--prefix", help="Target prefixes, one per input line (empty: none).")] = None,
    source_lang: Annotated[str | None, _flag(
        "--source-lang", help="A multilingual model's source language, as its code (eng_Latn, en, en_XX).")] = None,
    target_lang: Annotated[str | None, _flag(
        "--target-lang", help="A multilingual model's target language (deu_Latn, de, de_DE; Marian: deu).")] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option("--output-format", "-f", help="text: one translation a line; jsonl: with score and n-best list."),
    ] = OutputFormat.text,
    ref: Annotated[Path | None, _flag("--ref", help="Reference: print BLEU/chrF/TER on stderr at the end.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[int | None, _flag(
        "--threads", help="CPU threads (default: torch's), each translating its own batches "
        "(CTranslate2 threads or PyTorch worker processes).")] = None,
    chunk_lines: Annotated[
        int, typer.Option("--chunk-lines", help="Lines read, sorted and translated at a time.", min=1)
    ] = 10_000,
    flush_wait: Annotated[
        float,
        typer.Option("--flush-wait", min=0.0,
                     help="Seconds a pipe may pause before the lines read so far are translated and written "
                          "(stdin from a terminal: at once)."),
    ] = 0.2,
) -> None:
    """Translate text with a trained model: one output line per input line."""
    import torch

    from mtkit.checkpoint import load_for_inference
    from mtkit.config import load_config, resolve_decode
    from mtkit.engines import open_translator
    from mtkit.fileio import STDIN, open_output, read_lines
    from mtkit.progress import LineProgress
    from mtkit.runtime import inference_device, join_torchrun
    from mtkit.score import read_text, score
    from mtkit.translate import format_translations

    flags = dict(beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len, nbest=nbest,
                 batch_tokens=batch_tokens, batch_sentences=batch_sentences, sampling=sampling,
                 temperature=temperature, top_k=top_k, top_p=top_p,
                 length_penalty_form=length_penalty_form.value if length_penalty_form else None,
                 backend=backend.value if backend else None, compute_type=compute_type,
                 long_lines=long_lines.value if long_lines else None)
    if nbest is not None and nbest > 1 and output_format is OutputFormat.text:
        raise MtkitError("--nbest > 1 needs --output-format jsonl (text output has one line per input line)")
    if threads is not None:
        torch.set_num_threads(threads)
    device, shard = join_torchrun(inference_device(device))
    if shard is not None and STDIN in (input, str(prefix)):
        raise MtkitError("under torchrun every rank reads the input: name a file with -i (not stdin)")
    leader = shard is None or shard.rank == 0
    # Open every input before loading the model, so a wrong path fails at once.
    lines = read_lines(input, "replace", what="input", warn=_warn)
    prefixes = read_lines(str(prefix), "replace", what="prefix file", warn=_warn) if prefix is not None else None
    references = read_text(ref) if ref is not None and leader else None
    ready = None
    typed = lines.terminal
    if lines.streaming and shard is None:  # a pipe or a terminal: cut chunks where it pauses
        ready = functools.partial(lines.ready, 0.0 if typed else flush_wait)
    loaded = load_for_inference(model, device=device)
    decode = resolve_decode(loaded.config.decode, config, overrides, flags)
    # The compute-type check reads validation text the user names, never the checkpoint's data.valid.
    valid_sets = load_config(config).data.eval_sets("valid") if config is not None else []
    valid = valid_sets[0] if valid_sets else None
    seed = loaded.config.experiment.seed if seed is None else seed
    # On a CPU, threads go to concurrent batches: CTranslate2's inter_threads, or PyTorch worker
    # processes of one thread each (one process per rank under torchrun).
    workers = 1 if shard is not None else threads or torch.get_num_threads()
    translator = open_translator(loaded, decode, device, threads=threads, workers=workers, seed=seed, valid=valid,
                                 say=_say if leader else _quiet, warn=_warn, src_lang=source_lang,
                                 tgt_lang=target_lang)

    hyps: list[str] = []  # kept only to score them: memory stays bounded otherwise
    count = 0
    # Other ranks receive no chunks: they write nothing and show no progress.
    with translator, LineProgress() as progress:
        with open_output(output if leader else None) as sink:
            for chunk in translator.translate_stream(lines, prefixes, chunk_lines=chunk_lines, shard=shard,
                                                     ready=ready):
                sink.write(format_translations(chunk, output_format.value).encode("utf-8"))
                sink.flush()
                count += len(chunk)
                if references is not None:
                    hyps.extend(t.text for t in chunk)
                if not typed:  # a redrawn line would get in the way of someone typing
                    progress.update(count)
            if leader and prefixes is not None and next(prefixes, None) is not None:
                raise MtkitError(f"{prefix}: more lines than the input ({count})")
        if leader:
            progress.done(count)
    if translator.split_lines:
        _say(f"{translator.split_lines} line{'s' * (translator.split_lines > 1)} longer than the model accepts "
             "translated in pieces cut at sentence boundaries (--long-lines truncate cuts them instead)")
    if shard is not None:
        torch.distributed.destroy_process_group()
    if references is not None:
        if len(references) != len(hyps):
            raise MtkitError(f"{ref}: {len(references)} lines but the input has {len(hyps)}")
        for result in score(hyps, [references], tgt_lang=target_lang or loaded.config.data.tgt_lang):
            typer.echo(result.text, err=True)


def _warn(message: str) -> None:
    typer.echo(f"mtkit: warning: {message}", err=True)


def _say(message: str) -> None:
    typer.echo(f"mtkit: {message}", err=True)


def _quiet(message: str) -> None:
    """Other ranks under torchrun: rank 0 says it."""

