"""A worker's /metrics endpoint (the frontend's /metrics gathers it, observability/aggregate.py): this
process's Prometheus registry over HTTP on its own thread, answering only requests that carry
`Authorization: Bearer <token>` when a token is set (the app's API key), 401 otherwise."""

import hmac
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        """Scrapes are not worth a log line each."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _authorized(app, token: str):
    expected = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"missing or wrong bearer token\n"]
        return app(environ, start_response)

    return guarded


def start_metrics_server(addr: str, token: str | None = None) -> WSGIServer:
    """Serves on addr, a free port (server.server_port); stop with shutdown() and server_close()."""
    app = make_wsgi_app()
    server = make_server(
        addr,
        0,
        app if token is None else _authorized(app, token),
        _ThreadingServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="ridgeline-metrics").start()
    return server
