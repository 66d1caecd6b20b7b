"""A translation service: a batching engine per language pair and the HTTP app in front of it.

``Engine`` turns concurrent requests into few ``Translator.translate_lines`` calls: requests
queue their sentences; one worker thread waits up to ``max_wait`` after the oldest pending
request arrived (or until ``batch_tokens`` source tokens are pending), then translates the
sentences of every pending request in one call, so that ten clients at once cost little more
than one. The queue is bounded (``QueueFull``), every request has a deadline, and a request
that timed out or whose client went away has its not-yet-started sentences dropped. The
event loop never runs the model: it only splits text, queues it and awaits the result.

``create_app`` builds the LibreTranslate-compatible API (docs/serving.md): ``POST /translate``,
``GET /languages``, ``/health``, ``/frontend/settings``, ``/info`` and the page at ``/``.
Bodies are parsed here, not by the framework, so that every error is ``{"error": "..."}``
with the status an operator of LibreTranslate expects. The defaults are those of a public
service: a Host that is neither localhost nor the server's own address is refused (DNS
rebinding), JSON must come as ``application/json``, a body must arrive within a deadline,
``/info`` wants the API key, and keys are compared in constant time (``ServeSettings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from mtkit import __version__

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from mtkit.translate import Translation, Translator

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the engine


class QueueFull(Exception):
    """The engine's queue holds ``queue_size`` requests already (HTTP 503)."""


class Stopped(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(eq=False)
class _Job:
    """One request's sentences. The worker takes them in order (``taken``); results come
    back into ``results``; ``future`` (of the submitting event loop) gets the list."""

    segments: list[str]
    lengths: list[int]  # source tokens of each segment, EOS included
    nbest: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Translation]]
    arrived: float
    results: list[Translation | None] = field(default_factory=list)
    taken: int = 0
    done: int = 0
    cancelled: bool = False


@dataclass
class EngineStats:
    """Counters since start: ``batches`` is the number of ``translate_lines`` calls."""

    requests: int = 0
    sentences: int = 0
    batches: int = 0
    dropped_sentences: int = 0
    rejected: int = 0
    timeouts: int = 0
    largest_batch: int = 0


class Engine:
    """Batches the sentences of concurrent requests for one ``Translator`` (one language pair).

    batch_tokens: most source tokens in one merged call (a request's sentences may be split
      across calls; a single longer sentence goes alone).
    max_wait: seconds the worker waits after the oldest pending request arrived for others
      to join its batch (0: take whatever is pending).
    queue_size: most requests waiting (not yet fully started); beyond it ``QueueFull``.
    batching: False translates one request at a time (all its sentences in one call), the
      way LibreTranslate serves; for comparisons.
    workers: worker threads taking batches from the one queue. With two, one batch is
      translated while the next forms and the other's Python work overlaps the first's
      tensor work; give each fewer torch threads (``mtkit serve --workers``). Always 1 when
      ``batching`` is False (one request at a time).
    Requests asking for ``nbest`` hypotheses are batched only with requests asking the same.
    """

    def __init__(
        self,
        translator: Translator,
        *,
        batch_tokens: int | None = None,
        max_wait: float = 0.01,
        queue_size: int = 256,
        batching: bool = True,
        workers: int = 1,
        name: str = "engine",
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}: need at least 1")
        if workers < 1:
            raise ValueError(f"workers={workers}: need at least 1")
        self.translator = translator
        self.batch_tokens = batch_tokens or translator.decode.batch_tokens
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.batching = batching
        self.stats = EngineStats()
        self._translators: dict[int, Translator] = {translator.decode.nbest: translator}
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"mtkit-serve-{name}-{i}", daemon=True)
                         for i in range(workers if batching else 1)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ the event loop's side

    @property
    def running(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._stopping

    @property
    def pending(self) -> int:
        """Requests waiting for the worker (some of their sentences not yet started)."""
        return len(self._jobs)

    async def translate(self, segments: list[str], nbest: int = 1, timeout: float | None = None) -> list[Translation]:
        """One ``Translation`` per segment (each with up to ``nbest`` hypotheses). Raises
        ``QueueFull``, ``Stopped``, ``TimeoutError`` after ``timeout`` seconds in all; on a
        timeout or a cancellation (the client went away) the segments not yet started are
        dropped."""
        if not segments:
            return []
        lengths = [len(ids) + 1 for ids in self.translator.tokenizers.src.encode(segments)]
        loop = asyncio.get_running_loop()
        job = _Job(segments, lengths, nbest, loop, loop.create_future(), time.monotonic(),
                   results=[None] * len(segments))
        with self._cv:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._jobs) >= self.queue_size:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._jobs)} requests are waiting already")
            self._jobs.append(job)
            self.stats.requests += 1
            self._cv.notify()
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            self._drop(job)
            raise TimeoutError(f"no translation within {timeout:g} s") from None
        except BaseException:  # cancelled: the client disconnected
            self._drop(job)
            raise

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests already queued, then stop the workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))

    def _drop(self, job: _Job) -> None:
        with self._cv:
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
            self.stats.dropped_sentences += len(job.segments) - job.taken

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if not self._jobs:
                    return  # stopping, and nothing left
                if self.batching:
                    deadline = self._jobs[0].arrived + self.max_wait
                    while (not self._stopping and self._jobs and self._pending_tokens() < self.batch_tokens
                           and (left := deadline - time.monotonic()) > 0):
                        self._cv.wait(left)
                pieces = self._take()
            if pieces:
                self._translate(pieces)

    def _pending_tokens(self) -> int:
        nbest = self._jobs[0].nbest
        return sum(sum(j.lengths[j.taken:]) for j in self._jobs if j.nbest == nbest)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Under the lock: the next batch as ``(job, start, stop)`` slices of segments, oldest
        request first, at most ``batch_tokens`` tokens (at least one segment)."""
        if not self._jobs:
            return []
        nbest = self._jobs[0].nbest
        pieces: list[tuple[_Job, int, int]] = []
        tokens = 0
        for job in list(self._jobs):
            if job.nbest != nbest:
                continue
            start = stop = job.taken
            if not self.batching:
                stop = len(job.segments)
            else:
                while stop < len(job.segments) and (tokens + job.lengths[stop] <= self.batch_tokens or not tokens):
                    tokens += job.lengths[stop]
                    stop += 1
            if stop > start:
                pieces.append((job, start, stop))
                job.taken = stop
                if stop == len(job.segments):
                    self._jobs.remove(job)
            if not self.batching or stop < len(job.segments):
                break  # one request at a time, or the budget is spent
        return pieces

    def _translator(self, nbest: int) -> Translator:
        from mtkit.translate import Translator

        with self._cv:  # workers may ask at once
            if nbest not in self._translators:
                base = self.translator
                decode = base.decode.model_copy(update={"nbest": nbest})
                self._translators[nbest] = Translator(base.model, base.tokenizers, decode, base.device,
                                                      warn=base.warn, backend=base.backend)
            return self._translators[nbest]

    def _translate(self, pieces: list[tuple[_Job, int, int]]) -> None:
        if all(job.cancelled for job, _, _ in pieces):
            return  # every requester went away between taking and translating
        lines = [line for job, start, stop in pieces for line in job.segments[start:stop]]
        try:
            translations = self._translator(pieces[0][0].nbest).translate_lines(lines)
        except Exception as err:  # reported to each waiting request; the worker lives on
            log.exception("translation failed")
            for job, _, _ in pieces:
                _call_in_loop(job, _fail, err)
            return
        position = 0
        with self._cv:  # another worker may hold other sentences of the same requests
            self.stats.batches += 1
            self.stats.sentences += len(lines)
            self.stats.largest_batch = max(self.stats.largest_batch, len(lines))
            for job, start, stop in pieces:
                job.results[start:stop] = translations[position : position + stop - start]
                position += stop - start
                job.done += stop - start
                if job.done == len(job.segments):
                    _call_in_loop(job, _resolve, job.results)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # not cancelled meanwhile (timeout, disconnect)
        future.set_result(value)


def _fail(future: asyncio.Future[Any], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


def _call_in_loop(job: _Job, callback: Callable[..., None], value: Any) -> None:
    """Run ``callback(job.future, value)`` in the job's event loop, unless that loop has
    closed meanwhile (its requester is gone; the worker must live on)."""
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(callback, job.future, value)


# --------------------------------------------------------------------------- text


# The line breaks str.splitlines() knows, CRLF as one.
_LINE_BREAK = re.compile("(\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029])")
# A sentence ends at . ! ? ... (with closing quotes or brackets) before whitespace, or at a
# CJK full stop (with closing quotes or brackets) before anything but another closer; the
# separator (whitespace, or none in Chinese and Japanese) is kept to rejoin the translations.
_CJK_CLOSERS = "\"'\u201d\u2019\u300d\u300f\uff09\u3011\u300b\u3009)\\]"  # quotes, brackets
_SENTENCE_END = re.compile(
    "[.!?\u2026]+[\"'\u201d\u2019\u00bb)\\]]*(?P<a>\\s+)(?=\\S)"  # Latin: . ! ? \u2026, then whitespace
    f"|[\u3002\uff01\uff1f]+[{_CJK_CLOSERS}]*(?P<b>\\s*)(?=[^\\s{_CJK_CLOSERS}])"  # CJK: \u3002 \uff01 \uff1f
)


@dataclass
class Layout:
    """A text cut into sentences: ``parts`` alternates literal text (line breaks, spaces)
    with slots (ints) indexing ``sentences``; ``join`` puts translations back in."""

    parts: list[str | int]
    sentences: list[str]

    def join(self, translations: list[str]) -> str:
        return "".join(translations[p] if isinstance(p, int) else p for p in self.parts)


def split_text(text: str) -> Layout:
    """Cut ``text`` into lines (keeping each break as it was) and each line into sentences;
    leading and trailing spaces of a line, and empty lines, stay as they are."""
    parts: list[str | int] = []
    sentences: list[str] = []
    for i, chunk in enumerate(_LINE_BREAK.split(text)):
        if i % 2:  # a line break
            parts.append(chunk)
            continue
        body = chunk.strip()
        if not body:
            parts.append(chunk)
            continue
        lead = chunk[: len(chunk) - len(chunk.lstrip())]
        parts.append(lead)
        start = 0
        for match in _SENTENCE_END.finditer(body):
            gap = "a" if match.group("a") is not None else "b"
            end = match.start(gap)
            if match.end() < len(body) and body[match.end()].islower():
                continue  # "e.g. this": not a new sentence
            parts += [len(sentences), body[end : match.end()]]
            sentences.append(body[start:end])
            start = match.end()
        parts.append(len(sentences))
        sentences.append(body[start:])
        parts.append(chunk[len(lead) + len(body) :])
    return Layout([p for p in parts if p != ""], sentences)


# --------------------------------------------------------------------------- the app


LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "ga": "Irish", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
    "hu": "Hungarian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}


@dataclass
class Pair:
    """One language pair served: its engine, and what ``/info`` says about it."""

    source: str
    target: str
    engine: Engine
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_alternatives(self) -> int:
        """Beam search returns at most ``beam`` hypotheses; sampling draws as many as asked
        (capped so one request cannot occupy the worker for long)."""
        decode = self.engine.translator.decode
        return 9 if decode.sampling else decode.beam - 1


@dataclass
class ServeSettings:
    """Limits and guards of the service (see ``mtkit serve --help``); the defaults are the safe ones."""

    char_limit: int = 5000
    timeout: float = 30.0
    api_keys: frozenset[str] | None = None
    retry_after: int = 1
    # Host names accepted besides localhost names and the address a connection came in on
    # (``host_allowed``); None accepts any Host.
    allowed_hosts: frozenset[str] | None = frozenset()
    # Seconds a client may take to send a request body (408 beyond); None: no limit.
    body_timeout: float | None = 10.0
    # A JSON body must say ``Content-Type: application/json``, which a browser sends cross-site
    # only after a CORS preflight that this server never answers.
    json_content_type: bool = True
    # ``/info`` (engine statistics, paths) wants an API key when keys are on.
    info_needs_key: bool = True


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def host_allowed(host: str | None, local_address: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a request with this ``Host`` header is served. A web page whose own name has been
    made to resolve to this machine (DNS rebinding) would otherwise reach a server on localhost
    from the visitor's browser; such a request carries the page's name as Host. Accepted: a
    loopback address, ``localhost`` and ``*.localhost``, ``local_address`` (the address the
    connection came in on, so that ``--host 0.0.0.0`` answers on every address of the machine)
    and the names in ``allowed`` (None: any). A request without Host (HTTP/1.0) is not a
    browser's and is accepted."""
    if host is None or allowed is None:
        return True
    name = _host_name(host)
    if name in ("localhost", local_address) or name.endswith(".localhost") or name in allowed:
        return True
    address, local = _ip_address(name), _ip_address(local_address)
    return address is not None and (address.is_loopback or address == local)


def _ip_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` spells, an IPv4 one for an IPv4-mapped IPv6 one (``--host ::``
    sees IPv4 clients so); None for a name."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _host_name(host: str) -> str:
    """``Example.COM.:5000`` -> ``example.com``, ``[::1]:5000`` -> ``::1``."""
    host = host.strip().lower()
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    return name.rstrip(".")


def parse_allowed_hosts(text: str) -> frozenset[str] | None:
    """``--allowed-hosts``: comma-separated names (a port or brackets are ignored); ``*``: any (None)."""
    names = {_host_name(part) for part in text.split(",") if part.strip()}
    return None if "*" in names else frozenset(names)


class HostGuard:
    """ASGI middleware: a request whose Host is not allowed (``host_allowed``) gets a 400."""

    def __init__(self, app: Any, allowed: frozenset[str] | None):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            host = Headers(scope=scope).get("host")
            server = scope.get("server")
            if not host_allowed(host, server[0] if server else None, self.allowed):
                message = (f"Host {(host or '').strip()!r} is not served here (a guard against DNS rebinding); "
                           f"the operator can allow it with mtkit serve --allowed-hosts {_host_name(host or '')}")
                await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def read_api_keys(text: str) -> frozenset[str]:
    """The keys of an API-key file: one a line; blank lines and ``#`` comments ignored."""
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def create_app(pairs: list[Pair], settings: ServeSettings | None = None,
               on_ready: Callable[[], None] | None = None) -> Starlette:
    """The HTTP app over ``pairs`` (engines already started; closed when the app shuts down).
    ``on_ready`` is called once the app has started (``mtkit serve`` prints its line then)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    settings = settings or ServeSettings()
    by_pair = {(p.source, p.target): p for p in pairs}
    if len(by_pair) != len(pairs):
        raise ValueError("two engines serve the same language pair")
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["ready"] = all(p.engine.running for p in pairs)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            # The server has finished the requests in flight by now.
            state["ready"] = False
            for pair in pairs:
                pair.engine.close(timeout=settings.timeout)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    async def mtkit_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error(exc.status, str(exc), exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error ({type(exc).__name__})")

    def languages() -> list[dict[str, Any]]:
        codes = sorted({code for pair in by_pair for code in pair})
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                 "targets": sorted(t for s, t in by_pair if s == code)} for code in codes]

    async def get_languages(request: Request) -> Response:
        return JSONResponse(languages())

    async def get_health(request: Request) -> Response:
        if not state["ready"] or not all(p.engine.running for p in pairs):
            return error(503, "not ready (loading or shutting down)")
        return JSONResponse({"status": "ok"})

    async def get_settings(request: Request) -> Response:
        return JSONResponse({"charLimit": settings.char_limit, "keyRequired": settings.api_keys is not None,
                             "languages": languages()})

    async def get_info(request: Request) -> Response:
        if settings.info_needs_key and settings.api_keys is not None:
            key = request.query_params.get("api_key")
            if not key:
                raise HTTPError(403, "missing api_key: this server's /info needs ?api_key=KEY")
            check_key({"api_key": key}, settings.api_keys)
        models = []
        for (source, target), pair in by_pair.items():
            engine = pair.engine
            models.append({"source": source, "target": target, **pair.info,
                           "decode": engine.translator.decode.model_dump(),
                           "batching": {"enabled": engine.batching, "batch_tokens": engine.batch_tokens,
                                        "max_wait_ms": engine.max_wait * 1000, "queue_size": engine.queue_size,
                                        "pending": engine.pending},
                           "stats": vars(engine.stats).copy(), "max_alternatives": pair.max_alternatives})
        return JSONResponse({"mtkit_version": __version__, "char_limit": settings.char_limit,
                             "timeout_s": settings.timeout, "key_required": settings.api_keys is not None,
                             "models": models})

    async def get_page(request: Request) -> Response:
        page = importlib.resources.files("mtkit").joinpath("web").joinpath("index.html")
        try:
            return HTMLResponse(page.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return error(404, "the web page is not installed (mtkit/web/index.html is missing)")

    async def post_translate(request: Request) -> Response:
        try:
            fields = await read_fields(request, settings)
        except ClientDisconnect:  # gone before sending the whole body: nothing to do
            return Response(status_code=499)
        check_key(fields, settings.api_keys)
        texts, pair, nbest = parse_request(fields, by_pair, settings.char_limit)
        layouts = [split_text(text) for text in texts]
        sentences = [s for layout in layouts for s in layout.sentences]
        work = asyncio.ensure_future(pair.engine.translate(sentences, nbest, settings.timeout))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client went away: stop waiting; its unstarted sentences are dropped
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return Response(status_code=499)
        try:
            translations = work.result()
        except QueueFull:
            raise HTTPError(503, "the server is busy (its queue is full); retry later",
                            {"Retry-After": str(settings.retry_after)}) from None
        except Stopped:
            raise HTTPError(503, "the server is shutting down", {"Retry-After": str(settings.retry_after)}) from None
        except TimeoutError:
            raise HTTPError(504, f"the translation took longer than {settings.timeout:g} s") from None
        return JSONResponse(build_response(fields["q"], layouts, translations, nbest - 1 if "alternatives" in fields
                                           and nbest > 1 else None))

    routes = [
        Route("/", get_page, methods=["GET"]),
        Route("/translate", post_translate, methods=["POST"]),
        Route("/languages", get_languages, methods=["GET"]),
        Route("/health", get_health, methods=["GET"]),
        Route("/frontend/settings", get_settings, methods=["GET"]),
        Route("/info", get_info, methods=["GET"]),
    ]
    handlers = {StarletteHTTPException: http_exception, HTTPError: mtkit_http_error, Exception: internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                     middleware=[Middleware(HostGuard, allowed=settings.allowed_hosts)])


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- requests


def _body_limit(char_limit: int) -> int:
    # Every character may take 4 UTF-8 bytes, each escaped as %XX (form) or \uXXXX (JSON).
    return char_limit * 12 + 65536


# Digits of the longest integer a JSON body may hold: Python parses longer ones in quadratic
# time, and refuses (ValueError) those past sys.get_int_max_str_digits().
_MAX_INT_DIGITS = 100


async def read_fields(request: Request, settings: ServeSettings) -> dict[str, Any]:
    """The fields of a JSON, urlencoded or multipart body (a repeated form field becomes a
    list). HTTPError 400 for malformed bodies or invalid UTF-8, 408 for a body that took over
    ``settings.body_timeout`` to arrive, 413 for an oversized one, 415 for JSON sent without
    ``Content-Type: application/json`` (unless ``settings.json_content_type`` is off)."""
    limit = _body_limit(settings.char_limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body over {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # The deadline holds for the whole body, so that a client trickling a byte at a time
    # (slowloris) cannot hold a connection open for long.
    try:
        body = await asyncio.wait_for(receive(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                        {"Connection": "close"}) from None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/x-www-form-urlencoded":
            return _group(_urlencoded(body))
        if content_type == "multipart/form-data":
            return _group(_multipart(body, request.headers.get("content-type", "")))
        if settings.json_content_type and content_type != "application/json":
            sent = f"Content-Type {content_type}" if content_type else "no Content-Type"
            raise HTTPError(415, f"a JSON body needs Content-Type: application/json (got {sent}); forms may be "
                                 "application/x-www-form-urlencoded or multipart/form-data")
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_int=_json_int)
    except (json.JSONDecodeError, RecursionError) as err:
        message = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise HTTPError(400, f"malformed JSON: {message}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "malformed request: expected a JSON object")
    return data


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise HTTPError(400, f"malformed JSON: an integer of {digits} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _urlencoded(body: bytes) -> list[tuple[str, str]]:
    pairs = []
    for part in body.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append(tuple(unquote_to_bytes(x.replace(b"+", b" ")).decode("utf-8") for x in (name, value)))
    return pairs  # type: ignore[return-value]


def _multipart(body: bytes, content_type: str) -> list[tuple[str, str]]:
    import io

    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    pairs: list[tuple[str, str]] = []

    def on_field(f: Any) -> None:
        pairs.append((f.field_name.decode("utf-8"), (f.value or b"").decode("utf-8")))

    def on_file(f: Any) -> None:
        raise HTTPError(400, f"unexpected file in field {f.field_name.decode('utf-8', 'replace')!r}")

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(headers, io.BytesIO(body), on_field, on_file)
    except (FormParserError, ValueError) as err:
        if isinstance(err, UnicodeDecodeError):
            raise
        raise HTTPError(400, f"malformed multipart body: {err}") from None
    return pairs


def _group(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            fields[name] = (fields[name] if isinstance(fields[name], list) else [fields[name]]) + [value]
        else:
            fields[name] = value
    return fields


def check_key(fields: dict[str, Any], keys: frozenset[str] | None) -> None:
    if keys is None:
        return
    key = fields.get("api_key")
    if not key:
        raise HTTPError(403, "missing api_key: this server requires an API key")
    if not isinstance(key, str) or not _known_key(key, keys):
        raise HTTPError(403, "invalid api_key")


def _known_key(key: str, keys: frozenset[str]) -> bool:
    """Whether ``key`` is one of ``keys``, in a time that tells nothing of how much of it is
    right: every key is compared, each as a SHA-256 digest (equal lengths) in constant time."""

    def digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    wanted = digest(key)
    found = False
    for known in keys:
        found |= hmac.compare_digest(wanted, digest(known))
    return found


def parse_request(fields: dict[str, Any], pairs: dict[tuple[str, str], Pair],
                  char_limit: int) -> tuple[list[str], Pair, int]:
    """The texts, the language pair and the hypotheses per sentence (1 + alternatives) of a
    ``/translate`` request; HTTPError 400 or 413 naming the problem."""
    for name in ("q", "source", "target"):
        if name not in fields:
            raise HTTPError(400, f"missing field: {name}")
    q = fields["q"]
    texts = q if isinstance(q, list) else [q]
    if not all(isinstance(t, str) for t in texts):
        raise HTTPError(400, "q: expected a string or a list of strings")
    source, target = fields["source"], fields["target"]
    if not isinstance(source, str) or not isinstance(target, str):
        raise HTTPError(400, "source and target: expected language codes")
    if source == "auto":  # no language detection: fine when only one source translates into target
        sources = sorted({s for s, t in pairs if t == target})
        if len(sources) != 1:
            raise HTTPError(400, "source: auto works only when one source language translates into target; "
                                 "name the source language")
        source = sources[0]
    if (source, target) not in pairs:
        served = ", ".join(f"{s}->{t}" for s, t in pairs)
        raise HTTPError(400, f"{source}->{target}: language pair not served (served: {served})")
    pair = pairs[(source, target)]
    text_format = fields.get("format", "text")
    if text_format == "html":
        raise HTTPError(400, "format: html is not supported; send plain text with format text")
    if text_format != "text":
        raise HTTPError(400, f"format: {text_format!r} is not a format; use text")
    alternatives = fields.get("alternatives", 0)
    if isinstance(alternatives, str) and re.fullmatch("[0-9]{1,9}", alternatives.strip()):
        alternatives = int(alternatives)
    if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
        raise HTTPError(400, "alternatives: expected a whole number >= 0")
    if alternatives > pair.max_alternatives:
        decode = pair.engine.translator.decode
        why = (f"beam search with beam {decode.beam} finds {decode.beam} hypotheses" if not decode.sampling
               else "sampling draws at most 10 per sentence here")
        raise HTTPError(400, f"alternatives: at most {pair.max_alternatives} for {source}->{target} ({why})")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in JSON ("\ud800")
            raise HTTPError(400, "q: not valid Unicode (a lone surrogate)") from None
    chars = sum(len(t) for t in texts)
    if chars > char_limit:
        raise HTTPError(413, f"text of {chars} characters is over the limit of {char_limit}")
    return texts, pair, alternatives + 1


def build_response(q: Any, layouts: list[Layout], translations: list[Translation],
                   alternatives: int | None) -> dict[str, Any]:
    """``translatedText`` (and ``alternatives``, up to that many distinct other translations
    per text) shaped like ``q``."""
    texts, alts = [], []
    position = 0
    for layout in layouts:
        mine = translations[position : position + len(layout.sentences)]
        position += len(layout.sentences)
        best = layout.join([t.text for t in mine])
        texts.append(best)
        if alternatives is not None:
            seen, others = {best}, []
            most = max((len(t.nbest) for t in mine), default=0)
            for k in range(1, most):
                candidate = layout.join([t.nbest[k][0] if k < len(t.nbest) else t.text for t in mine])
                if candidate not in seen:
                    seen.add(candidate)
                    others.append(candidate)
            alts.append(others[:alternatives])
    single = not isinstance(q, list)
    response: dict[str, Any] = {"translatedText": texts[0] if single else texts}
    if alternatives is not None:
        response["alternatives"] = alts[0] if single else alts
    return response
