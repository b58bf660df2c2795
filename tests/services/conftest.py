import pytest
from serving_helpers import MODEL, http_server

from engine.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def async_llm(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=256, max_model_len=256)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(async_llm):
    """A real HTTP server on 127.0.0.1 serving the frontend; yields its base URL."""
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    with http_server(build_frontend(OpenAIServing(async_llm, MODEL))) as url:
        yield url
