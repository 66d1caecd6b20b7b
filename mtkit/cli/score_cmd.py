"""``mtkit score REF... [-i HYP]``: BLEU, chrF and TER of a translation, with sacrebleu signatures.

The hypothesis comes from stdin unless ``-i`` names a file, so a pipeline reads
``mtkit translate -m RUN < test.en | mtkit score test.de``. Several references: repeat
``REF`` (``mtkit score ref1.de ref2.de -i hyp.de``). Files may be gzip. The numbers and
signatures equal ``sacrebleu REF... -i HYP -m bleu chrf ter``; with ``-l zh`` (or ja), those of
``sacrebleu -l en-zh --ter-asian-support --ter-normalized``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mtkit.errors import MtkitError

if TYPE_CHECKING:
    from mtkit.score import Comparison


def score(
    refs: Annotated[
        list[Path],
        typer.Argument(metavar="REF", help="Reference file(s), plain or .gz (several: multi-ref).", show_default=False),
    ],
    input: Annotated[str, typer.Option("--input", "-i", help="Hypothesis file, or - for stdin.")] = "-",
    metrics: Annotated[str, typer.Option("--metrics", "-m", help="Comma-separated list.")] = "bleu,chrf,ter",
    lang: Annotated[
        str | None,
        typer.Option("--lang", "-l", show_default=False,
                     help="Target language, e.g. zh: zh, ja, ko pick BLEU's tokenizer; zh, ja make TER split "
                          "CJK characters (sacrebleu's --ter-asian-support --ter-normalized)."),
    ] = None,
    tokenize: Annotated[
        str | None,
        typer.Option("--tokenize", "-t", help="BLEU tokenizer (13a, intl, zh, char, none...), over --lang.",
                     show_default=False),
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option("--compare", help="Another system: paired bootstrap test (repeatable).", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Score a translation against reference(s) with sacrebleu."""
    from mtkit import score as scoring

    names = [m.strip().lower() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in scoring.METRICS]
    if unknown or not names:
        listed = ", ".join(unknown) or "(none)"
        raise MtkitError(f"--metrics: unknown {listed}; choose from {', '.join(scoring.METRICS)}")
    references = [scoring.read_text(path) for path in refs]
    hyp_name = "<stdin>" if input == "-" else input
    hyps = scoring.read_text(input)
    if not hyps:
        raise MtkitError(f"{hyp_name} has no lines: nothing to score")
    for path, ref in zip(refs, references, strict=True):
        if len(ref) != len(hyps):
            raise MtkitError(f"{hyp_name} has {len(hyps)} lines but {path} has {len(ref)}")
    if scoring.looks_tokenized(hyps):
        typer.echo(f"mtkit: warning: {hyp_name} contains '\u2581': it looks SentencePiece-tokenized; "
                   "detokenize before scoring", err=True)

    if compare:
        systems = [(hyp_name, hyps)] + [(str(path), scoring.read_text(path)) for path in compare]
        _print_comparison(scoring.compare(systems, references, names, tgt_lang=lang, tokenize=tokenize), as_json)
        return
    results = scoring.score(hyps, references, names, tgt_lang=lang, tokenize=tokenize)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False))
    else:
        for result in results:
            typer.echo(result.text)


def _print_comparison(result: Comparison, as_json: bool) -> None:
    if as_json:
        data = {
            metric: {
                "signature": result.signatures[metric],
                "systems": [
                    {"system": system, "score": score, "mean": mean, "ci": ci, "p_value": p}
                    for system, score, mean, ci, p in rows
                ],
            }
            for metric, rows in result.rows.items()
        }
        typer.echo(json.dumps(data, indent=1, ensure_ascii=False))
        return
    for metric, rows in result.rows.items():
        typer.echo(f"{metric}|{result.signatures[metric]}")
        width = max(len(system) for system, *_ in rows)
        for i, (system, score, mean, ci, p) in enumerate(rows):
            stats = f"{score:6.1f}  (mean {mean:.1f} ± {ci:.1f})" if mean is not None else f"{score:6.1f}"
            flag = "" if p is None else f"  p = {p:.4f}" + (" *" if p < 0.05 else "")
            label = "baseline" if i == 0 else "        "
            typer.echo(f"  {label} {system:<{width}}  {stats}{flag}")
    typer.echo("(* significantly different from the baseline at p < 0.05, paired bootstrap resampling)")
