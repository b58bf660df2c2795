import socket
import threading
import time

import pytest
from serving_helpers import MODEL

from engine.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def async_llm(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=256, max_model_len=256)
    yield llm
    llm.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(async_llm):
    """A real HTTP server on 127.0.0.1 serving the frontend; yields its base URL."""
    import uvicorn

    from services.frontend import build_frontend

    port = _free_port()
    config = uvicorn.Config(build_frontend(async_llm, MODEL), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
