"""Shared by the serving tests."""

import contextlib
import socket
import threading
import time

from engine.async_llm import AsyncLLM

MODEL = "tiny-llama"


def wait_idle(llm: AsyncLLM, free_blocks: int, timeout: float = 10.0) -> None:
    """Bounded wait until the engine has finished everything and returned every block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (llm.num_unfinished() == 0 and llm.engine.block_manager.num_free_blocks == free_blocks
                and not llm.engine.has_unfinished_requests()):
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {llm.num_unfinished()} streams, "
                         f"{llm.engine.block_manager.num_free_blocks}/{free_blocks} blocks free")


@contextlib.contextmanager
def http_server(app):
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
