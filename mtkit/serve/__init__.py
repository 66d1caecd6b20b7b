"""A translation service: a batching engine per model (one language pair, or a multilingual
model's many) and the HTTP app in front of it.

- ``engine``: ``Engine`` merges the sentences of concurrent requests into few translation calls.
- ``languages``: a client's language code matched to a served one (``de`` -> ``deu``), and names.
- (``mtkit.sentences``: ``split_text`` cuts a text into sentences, ``Layout`` puts the translations back.)
- ``request``: request bodies read and checked, responses shaped like the request.
- ``app``: ``create_app``, the LibreTranslate-compatible API (docs/serving.md) and its guards.
- ``server``: ``run_server`` listens, loads, serves and stops gracefully on SIGTERM or Ctrl-C.

Starlette and uvicorn are imported only when an app is built or served.
"""

from mtkit.sentences import Layout, split_text
from mtkit.serve.app import (
    Pair,
    ServeSettings,
    check_key,
    create_app,
    host_allowed,
    parse_allowed_hosts,
    read_api_keys,
)
from mtkit.serve.engine import Engine, EngineStats, QueueFull, Stopped
from mtkit.serve.languages import LANGUAGE_NAMES, language_name, matches
from mtkit.serve.request import HTTPError, build_response, parse_request, read_fields
from mtkit.serve.server import run_server

__all__ = [
    "LANGUAGE_NAMES",
    "Engine",
    "EngineStats",
    "HTTPError",
    "Layout",
    "Pair",
    "QueueFull",
    "ServeSettings",
    "Stopped",
    "build_response",
    "check_key",
    "create_app",
    "host_allowed",
    "language_name",
    "matches",
    "parse_allowed_hosts",
    "parse_request",
    "read_api_keys",
    "read_fields",
    "run_server",
    "split_text",
]
