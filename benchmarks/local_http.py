"""An ASGI app served by uvicorn on a thread of this process, on 127.0.0.1 (tests and benchmarks that
drive the frontend over real HTTP without Ray)."""

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30.0):
    """Yields the base URL; the server stops when the block ends."""
    import uvicorn

    if port is None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True, name="ridgeline-http")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
