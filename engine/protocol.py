"""EngineClient: the one seam between the API server and whatever runs the engine (vLLM's
vllm/engine/protocol.py). AsyncLLM implements it in this process; the Ray pools' DisaggregatedClient
(services/pd_client.py) implements it over prefill and decode workers. The OpenAI frontend depends on
this protocol alone."""

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Tokenizer

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
        preemptible: bool = True,
        slo_class: str = "standard",
        trace_context: dict | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes; bad input raises ValueError before the
        first. Closing the iterator (a client that left) aborts the request everywhere."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request from outside its stream; it ends with finish_reason "abort". Returns at once."""
        ...

    def check_health(self) -> None:
        """Raises when the engine cannot serve (a dead or stalled step loop); returns otherwise."""
        ...

    def num_unfinished(self) -> int:
        """Requests started and not finished (the frontend's load)."""
        ...

    async def add_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        """Compute a document's KV into the document cache now (RAG, engine/documents.py), so prompts that
        hold it reuse it; ValueError when it cannot be stored."""
        ...

    async def remove_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        """Let a document added by add_document go."""
        ...
