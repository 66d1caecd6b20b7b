"""Running the service: the listening socket, uvicorn, and a graceful stop on SIGTERM or Ctrl-C."""

from __future__ import annotations

import errno
import signal
import socket
from collections.abc import Callable

from mtkit.errors import MtkitError
from mtkit.serve.app import Pair, ServeSettings, create_app


def run_server(load: Callable[[], list[Pair]], settings: ServeSettings, *, host: str, port: int,
               max_connections: int = 512, access_log: bool = False,
               say: Callable[[str], None] = print) -> None:
    """Listen on ``host:port``, then ``load`` the pairs and serve them until SIGTERM or Ctrl-C,
    which stops accepting connections and lets the requests in flight finish (at most
    ``settings.timeout`` seconds more). The port is taken before ``load`` so that a clash is
    reported before minutes of loading; clients that connect meanwhile wait in the listen
    backlog. ``max_connections``: most open connections (0: no limit). ``say`` gets the
    lines an operator reads (serving, stopped)."""
    import uvicorn

    sock = listen(host, port)
    try:
        pairs = load()
    except BaseException:
        sock.close()
        raise
    names = ", ".join(f"{p.source}->{p.target}" for p in pairs)
    if len(pairs) > 12:  # a many-to-many model serves thousands
        names = f"{len(pairs):,} language pairs of {len({c for p in pairs for c in (p.source, p.target)})} languages"
    url_host = f"[{host}]" if ":" in host else host
    bound_port = sock.getsockname()[1]

    def ready() -> None:
        say(f"serving {names} on http://{url_host}:{bound_port}")

    app = create_app(pairs, settings, on_ready=ready)
    # uvicorn counts the connection asking among the open ones: one more lets max_connections be open.
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=int(settings.timeout) + 5, lifespan="on",
                            limit_concurrency=max_connections + 1 if max_connections else None)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM and SIGINT while it serves (a graceful stop) and raises the
    # signal again when done; ignored by then, so a graceful stop exits 0.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise MtkitError("the server did not start (see the messages above)")
    say("stopped")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: any free one); MtkitError naming the
    options when the port is taken or the address cannot be used."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise MtkitError(f"--port {port}: {host}:{port} is in use already (pick another --port)") from None
        raise MtkitError(f"--host {host} --port {port}: cannot listen: {err.strerror or err}") from None
