"""Shared by the serving tests."""

import time

from benchmarks.local_http import serve_in_thread as http_server  # noqa: F401 - for the tests
from engine.async_llm import AsyncLLM

MODEL = "tiny-llama"


def wait_idle(llm: AsyncLLM, free_blocks: int, timeout: float = 10.0) -> None:
    """Bounded wait until the engine has finished everything and returned every block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            llm.num_unfinished() == 0
            and llm.engine.block_manager.num_free_blocks == free_blocks
            and not llm.engine.has_unfinished_requests()
        ):
            return
        time.sleep(0.02)
    raise AssertionError(
        f"engine not idle: {llm.num_unfinished()} streams, "
        f"{llm.engine.block_manager.num_free_blocks}/{free_blocks} blocks free"
    )
