"""Limits on what an HTTP client can make the server hold: a request body over MAX_BODY_BYTES is cut at the
limit and answered 413 (chunked bodies too: nothing past the limit is read or kept), a body that does not
arrive within BODY_READ_TIMEOUT_S is answered 408, and a connection that has not sent its request headers
within HEADER_READ_TIMEOUT_S is closed.

`BodyLimit` is an ASGI middleware. It wraps the frontend app, and — through Ray Serve's documented proxy hook
(`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=services.http_limits:proxy_middlewares`, which `ridgeline serve`
and the Helm chart set) — Serve's HTTP proxy, which otherwise reads every body whole into memory before the
app sees a byte of it.
"""

import asyncio
import json
import logging

MAX_BODY_BYTES = 4 * 2**20
BODY_READ_TIMEOUT_S = 30.0
HEADER_READ_TIMEOUT_S = 30.0
PROXY_CALLBACK = "services.http_limits:proxy_middlewares"

logger = logging.getLogger("ridgeline.http")


def _error(message: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()


async def _respond(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Reads an HTTP request's body (at most max_body_bytes, within read_timeout_s) before the app runs, then
    replays it; the app's later receive() calls (disconnect detection) go to the connection."""

    def __init__(
        self, app, max_body_bytes: int = MAX_BODY_BYTES, read_timeout_s: float = BODY_READ_TIMEOUT_S
    ):
        self.app, self.max_body_bytes, self.read_timeout_s = app, max_body_bytes, read_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _respond(
                send,
                413,
                _error(
                    f"request body: {int(declared)} bytes, at most {self.max_body_bytes}", "body_too_large"
                ),
            )
            return
        try:
            messages = await asyncio.wait_for(self._read(receive), self.read_timeout_s)
        except TimeoutError:
            await _respond(
                send,
                408,
                _error(f"request body: not received within {self.read_timeout_s:g} s", "body_timeout"),
            )
            return
        if messages is None:
            await _respond(
                send, 413, _error(f"request body: more than {self.max_body_bytes} bytes", "body_too_large")
            )
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read(self, receive) -> list[dict] | None:
        """The body's messages, or None once it passes the limit (the rest is never read)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # disconnected: the app sees it
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback: the body limit in front of every app, and header read deadlines on
    the proxy's connections."""
    from starlette.middleware import Middleware

    arm_header_deadlines()
    return [Middleware(BodyLimit)]


_ARMED: set[type] = set()  # uvicorn protocol classes already patched


def arm_header_deadlines(timeout_s: float = HEADER_READ_TIMEOUT_S) -> None:
    """Close a uvicorn connection that has not completed its first request's headers within timeout_s
    (uvicorn has no such timeout: a client trickling header bytes would hold the connection for ever)."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (h11_impl.H11Protocol, httptools_impl.HttpToolsProtocol):
        if protocol in _ARMED:
            continue
        made = protocol.connection_made

        def connection_made(self, transport, _made=made) -> None:
            _made(self, transport)
            self.loop.call_later(timeout_s, _close_if_no_request, self)

        setattr(protocol, "connection_made", connection_made)  # noqa: B010 - patching a class, on purpose
        _ARMED.add(protocol)


def _close_if_no_request(protocol) -> None:
    if protocol.cycle is None and not protocol.transport.is_closing():
        logger.info("closing a connection that sent no complete request headers in time")
        protocol.transport.close()
