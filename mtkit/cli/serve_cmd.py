"""``mtkit serve``: the translation service of ``mtkit.serve`` over HTTP (docs/serving.md).

Every run is loaded before the port opens (a bad run is a one-line error, not a server that
answers 500); each is a language pair from its config (``data.src_lang`` -> ``data.tgt_lang``),
or, for a multilingual model (an imported one), every pair of its languages (``served_pairs``).
Decoding settings: the checkpoint's, then ``--set decode.KEY=VALUE``, then ``--beam`` and
``--batch-tokens``. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in
flight finish (at most ``--timeout`` seconds more) and exits 0.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mtkit.cli.options import SetOption
from mtkit.errors import MtkitError

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.serve import Pair


def serve(
    models: Annotated[
        list[Path],
        typer.Option("--model", "-m", show_default=False,
                     help="Run directory (its final, else best, else last checkpoint) or checkpoint directory "
                          "(repeat: one per language pair)."),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).", min=0, max=65535)] = 5000,
    char_limit: Annotated[int, typer.Option("--char-limit", help="Most characters per request (413 beyond).",
                                            min=1)] = 5000,
    batch_tokens: Annotated[int | None, typer.Option(
        "--batch-tokens", help="Source tokens per merged batch (default: the checkpoint's decode.batch_tokens).",
        min=1, show_default=False)] = None,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", help="How long the oldest waiting request waits for others to join its batch.",
        min=0)] = 10.0,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Most waiting requests per pair (503 beyond).",
                                            min=1)] = 256,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a request may take in all (504 beyond).",
                                           min=0.001)] = 30.0,
    api_keys: Annotated[Path | None, typer.Option(
        "--api-keys", help="File of API keys, one a line: requests must send one as api_key (403 otherwise).",
        show_default=False)] = None,
    batching: Annotated[bool, typer.Option(
        "--batching/--no-batching", help="Merge concurrent requests into one batch (off: one request at a time).",
    )] = True,
    workers: Annotated[int, typer.Option(
        "--workers", help="Worker threads per language pair, each translating a batch of its own (with "
        "--batching); torch's CPU threads are shared out among them unless --threads is given.", min=1)] = 1,
    beam: Annotated[int | None, typer.Option("--beam", help="Beam size (1: greedy).", min=1,
                                             show_default=False)] = None,
    overrides: SetOption = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads in all (default: torch's).", min=1,
                                                show_default=False)] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request on stderr.")] = False,
    allowed_hosts: Annotated[str, typer.Option(
        "--allowed-hosts", help="Host names, comma-separated, that requests may name besides localhost and the "
        "address they reach (a guard against DNS rebinding; 400 otherwise), e.g. a reverse proxy's public "
        "name; '*': any.")] = "",
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", help="Seconds a client may take to send a request body (408 and the connection "
        "closed beyond); 0: no limit.", min=0)] = 10.0,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", help="Most open connections; a request beyond gets 503. 0: no limit.",
        min=0)] = 512,
    strict_json: Annotated[bool, typer.Option(
        "--strict-json/--lenient-json", help="A JSON body must say Content-Type: application/json (415 "
        "otherwise; forms are unaffected). Lenient: parse any other body as JSON.")] = True,
    private_info: Annotated[bool, typer.Option(
        "--private-info/--public-info", help="With --api-keys, /info wants ?api_key= too.")] = True,
) -> None:
    """Serve trained models over HTTP (LibreTranslate-compatible API and a web page at /)."""
    import torch

    from mtkit.runtime import inference_device
    from mtkit.serve import ServeSettings, parse_allowed_hosts, read_api_keys, run_server

    keys = None
    if api_keys is not None:
        try:
            keys = read_api_keys(api_keys.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise MtkitError(f"--api-keys {api_keys}: unreadable: {reason}") from None
        if not keys:
            raise MtkitError(f"--api-keys {api_keys}: no keys in the file (one a line)")
    # The CPU threads in all: CTranslate2 runs its batches on them one thread each; torch's are
    # shared out among the workers.
    cpu_threads = threads or torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_threads // workers) if batching else cpu_threads)
    device = inference_device(device)
    settings = ServeSettings(char_limit=char_limit, timeout=timeout, api_keys=keys,
                             allowed_hosts=parse_allowed_hosts(allowed_hosts), body_timeout=body_timeout or None,
                             json_content_type=strict_json, info_needs_key=private_info)
    load = functools.partial(_load_pairs, models, device, overrides, {"beam": beam, "batch_tokens": batch_tokens},
                             cpu_threads, max_wait=max_wait_ms / 1000, queue_size=queue_size, batching=batching,
                             workers=workers)
    run_server(load, settings, host=host, port=port, max_connections=max_connections, access_log=access_log,
               say=lambda message: typer.echo(f"mtkit: {message}", err=True))


def _load_pairs(models: list[Path], device: str, overrides: list[str] | None, flags: dict[str, Any],
                cpu_threads: int, **engine_options: Any) -> list[Pair]:
    """Load every run and start an engine for its language pair (one model per pair)."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.config import resolve_decode
    from mtkit.engines import open_translator
    from mtkit.serve import Engine, Pair

    pairs: list[Pair] = []
    served: dict[tuple[str, str], Path] = {}
    for model in models:
        run = load_for_inference(model, device=device)
        decode = resolve_decode(run.config.decode, None, overrides, flags)
        languages = served_pairs(run)
        for source, target, _, _ in languages:
            if (source, target) in served:
                raise MtkitError(f"{model}: translates {source}->{target}, like {served[source, target]}; "
                                 "serve one model per pair")
            served[source, target] = model
        source, target, src_lang, tgt_lang = languages[0]
        translator = open_translator(run, decode, device, threads=cpu_threads, say=functools.partial(_say, model),
                                     warn=_warn, src_lang=src_lang, tgt_lang=tgt_lang)
        info = {"checkpoint": str(run.path), "step": run.meta.get("step"), "device": device,
                "model": run.config.model.model_dump(), "tokenizer": run.config.tokenizer.model_dump(),
                "trained_with": run.meta.get("mtkit_version")}
        name = f"{source}-{target}" if len(languages) == 1 else model.name
        engine = Engine(translator, name=name, **engine_options)
        pairs += [Pair(s, t, engine, info, src, tgt) for s, t, src, tgt in languages]
    return pairs


def served_pairs(run: Loaded) -> list[tuple[str, str, str | None, str | None]]:
    """The language pairs ``run`` serves, each as ``(source, target, src_lang, tgt_lang)``: the
    codes clients use, and the model's codes its ``Translator`` takes (None for a model of one
    pair, named by ``data.src_lang`` -> ``data.tgt_lang``). A multilingual model serves every
    pair of its language tokens (``Tokenizers.languages``): one mtkit trained, each direction it
    was trained on; a multi-target Marian model, from
    ``data.src_lang`` into each; M2M100, NLLB, mBART-50, from each into each other."""
    data, languages = run.config.data, run.tokenizers.languages
    if languages is None:
        return [(data.src_lang, data.tgt_lang, None, None)]
    if languages.directions:  # trained by mtkit on these directions
        return [(s, t, s, t) for s, t in languages.directions]
    codes = sorted(languages.tokens)
    if languages.source == "src":
        return [(s, t, s, t) for s in codes for t in codes if s != t]
    return [(data.src_lang, t, None, t) for t in codes]


def _warn(message: str) -> None:
    typer.echo(f"mtkit: warning: {message}", err=True)


def _say(model: Path, message: str) -> None:
    typer.echo(f"mtkit: {model}: {message}", err=True)
