"""The HTTP app: the LibreTranslate-compatible API (docs/serving.md) over the engines.

``create_app`` serves ``POST /translate``, ``GET /languages``, ``/health``,
``/frontend/settings``, ``/info`` and the page at ``/``. The defaults are those of a public
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtkit import __version__
from mtkit.sentences import split_text
from mtkit.serve.engine import Engine, QueueFull, Stopped
from mtkit.serve.languages import language_name
from mtkit.serve.request import HTTPError, build_response, parse_request, read_fields

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response



@dataclass
class Pair:
    """One language pair served: its engine, and what ``/info`` says about it. The pairs of a
    multilingual model share its engine and name its languages: ``src_lang``/``tgt_lang``, the
    model's codes (``Translator``'s), None for a model that translates one pair."""

    source: str
    target: str
    engine: Engine
    info: dict[str, Any] = field(default_factory=dict)
    src_lang: str | None = None
    tgt_lang: str | None = None

    @property
    def languages(self) -> tuple[str | None, str | None] | None:
        """What the engine is told per request (None: the translator's own languages)."""
        return None if self.src_lang is None and self.tgt_lang is None else (self.src_lang, self.tgt_lang)

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


def check_key(fields: dict[str, Any], keys: frozenset[str] | None) -> None:
    """HTTPError 403 unless ``fields`` carries one of ``keys`` as ``api_key`` (None: no key needed)."""
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
    # A multilingual model's pairs share its engine: each engine once, in the pairs' order.
    engines = list({id(p.engine): p.engine for p in pairs}.values())
    codes = sorted({code for pair in by_pair for code in pair})
    served = [{"code": code, "name": language_name(code), "targets": sorted(t for s, t in by_pair if s == code)}
              for code in codes]
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["ready"] = all(engine.running for engine in engines)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            # The server has finished the requests in flight by now.
            state["ready"] = False
            for engine in engines:
                engine.close(timeout=settings.timeout)

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

    async def get_languages(request: Request) -> Response:
        return JSONResponse(served)

    async def get_health(request: Request) -> Response:
        if not state["ready"] or not all(engine.running for engine in engines):
            return error(503, "not ready (loading or shutting down)")
        return JSONResponse({"status": "ok"})

    async def get_settings(request: Request) -> Response:
        return JSONResponse({"charLimit": settings.char_limit, "keyRequired": settings.api_keys is not None,
                             "languages": served})

    async def get_info(request: Request) -> Response:
        if settings.info_needs_key and settings.api_keys is not None:
            key = request.query_params.get("api_key")
            if not key:
                raise HTTPError(403, "missing api_key: this server's /info needs ?api_key=KEY")
            check_key({"api_key": key}, settings.api_keys)
        models = []
        for engine in engines:
            mine = [p for p in pairs if p.engine is engine]
            pair = mine[0]
            # A multilingual model: its languages, not each of its (maybe thousands of) pairs.
            languages = ({"source": pair.source, "target": pair.target} if len(mine) == 1 else
                         {"sources": sorted({p.source for p in mine}), "targets": sorted({p.target for p in mine})})
            models.append({**languages, **pair.info,
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
        work = asyncio.ensure_future(pair.engine.translate(sentences, nbest, settings.timeout, pair.languages))
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
