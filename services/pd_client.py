"""The frontend's view of the worker pools: one request becomes a prefill call (first token + KV handle)
and a decode stream, or a single stream in aggregated mode. n > 1 fans out into n sequences.

A decode replica that dies mid-stream is survived by token-level migration: the tokens already streamed
are kept and another replica resumes from them (recomputing their KV). Cancelling the consumer (client
disconnect) cancels the calls in flight, which aborts the request in every worker.
"""

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

import ray.exceptions

from engine.async_llm import EngineDeadError
from engine.documents import DocumentSpan
from engine.llm_engine import check_prompt_ids
from engine.outputs import ComputeUsage, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from observability import tracing
from observability.metrics import REQUEST_MIGRATIONS, WORKERS_LOST
from services.streams import merge
from services.worker_protocol import Delta, SequenceState, WorkerLostError, WorkerRequest

logger = logging.getLogger("ridgeline.frontend")

# what a replica dying looks like to its caller; a replica whose engine loop died is as good as dead (Ray
# raises the worker's EngineDeadError as an instance of it), and Serve replaces it
WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, EngineDeadError)


def _wrap_int64(seed: int) -> int:
    """seed + i as an int64: the same generator state as the engine's (seed + i) mod 2**64."""
    return (seed + 2**63) % 2**64 - 2**63


def _unwrap(error: ValueError) -> ValueError:
    """A worker's ValueError without Ray's remote traceback (the ParameterError itself, its parameter
    kept): its message is the user's 400."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, ValueError) else ValueError(str(error))


class DisaggregatedClient:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        vocab_size: int,
        decode,
        prefill=None,
        max_migrations: int = 3,
        retry_backoff_s: float = 0.5,
        model_name: str = "",
    ):
        """decode, prefill: Ray Serve deployment handles; prefill None means aggregated mode."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.decode = decode
        self.decode_stream = decode.options(stream=True)  # one handle, so one router counts every stream
        self.prefill = prefill
        self.max_migrations = max_migrations
        self.retry_backoff_s = retry_backoff_s
        self.model_name = model_name  # metric label
        REQUEST_MIGRATIONS.labels(model_name)  # the series exists (at 0) before the first migration
        self._inflight = 0
        self._aborted: set[str] = set()  # abort() asked: the stream ends at its next output

    def num_unfinished(self) -> int:
        return self._inflight

    def abort(self, request_id: str) -> None:
        """Its stream stops at its next output, which cancels the pools' calls (aborting it there)."""
        self._aborted.add(request_id)

    async def add_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        """Computed now by a prompt of the document alone (one token generated), on the worker the router
        picks; that worker's document cache keeps it least recently used (not pinned: another worker
        computes it again on its first prompt that holds it)."""
        rid = f"document-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0)
        async for _ in self.generate(
            rid, list(token_ids), params, cache_salt=cache_salt, documents=(DocumentSpan(0, len(token_ids)),)
        ):
            pass

    async def remove_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        """Nothing is pinned on the workers: their document caches let it go as it ages."""

    def check_health(self) -> None:
        """The pools' replicas answer Serve's health checks themselves (a failing one is replaced and its
        requests migrate): nothing of theirs is checked from here."""

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        priority: int = 0,
        preemptible: bool = True,
        slo_class: str = "standard",
        trace_context: dict | None = None,
        documents: tuple[DocumentSpan, ...] = (),
        document_recompute: dict | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs, as AsyncLLM.generate gives them; bad input raises ValueError first. Documents
        are assembled by the worker that computes the prompt."""
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_ids(prompt_ids, self.vocab_size, self.max_model_len)
        params.check_vocab(self.vocab_size)
        states = [SequenceState(i, params.logprobs is not None) for i in range(params.n)]
        sequences = []
        for i in range(params.n):
            sub_params = (
                params
                if params.n == 1
                else dataclasses.replace(
                    params, n=1, seed=None if params.seed is None else _wrap_int64(params.seed + i)
                )
            )
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            sequences.append(
                self._sequence(
                    WorkerRequest(
                        sub_id,
                        prompt_ids,
                        sub_params,
                        cache_salt=cache_salt,
                        priority=priority,
                        preemptible=preemptible,
                        slo_class=slo_class,
                        trace_context=dict(trace_context or {}),
                        documents=tuple(documents),
                        document_recompute=document_recompute,
                    )
                )
            )
        text = prompt if isinstance(prompt, str) else None
        self._inflight += 1
        try:
            async for index, delta in merge(sequences):
                states[index].apply(delta)
                if request_id in self._aborted:
                    for s in states:
                        s.finish_reason = s.finish_reason or "abort"
                by_pool: dict[str, ComputeUsage] = {}
                for s in states:
                    for pool, usage in s.compute_by_pool.items():
                        by_pool[pool] = by_pool.get(pool, ComputeUsage()) + usage
                yield RequestOutput(
                    request_id,
                    text,
                    prompt_ids,
                    [s.output() for s in states],
                    finished=all(s.finished for s in states),
                    num_cached_tokens=max(s.num_cached_tokens for s in states),
                    compute=sum(by_pool.values(), ComputeUsage()),
                    compute_by_pool=by_pool,
                )
                if request_id in self._aborted:
                    return  # leaving merge cancels the pools' calls: the workers abort it
        finally:
            self._aborted.discard(request_id)
            self._inflight -= 1

    def _call_span(self, name: str, req: WorkerRequest, parent: dict):
        """A CLIENT span for one call to a pool; the request carries it to the router and the worker."""
        span = tracing.tracer().start_span(
            name,
            context=tracing.extract(parent),
            kind=tracing.SpanKind.CLIENT,
            attributes={"ridgeline.request_id": req.request_id},
        )
        req.trace_context = tracing.inject(span)
        return span

    async def _sequence(self, req: WorkerRequest) -> AsyncIterator[Delta]:
        parent = req.trace_context  # the frontend's span
        if self.prefill is not None:
            span = self._call_span("prefill", req, parent)
            call = self.prefill.prefill.remote(req)
            try:
                result = await call
            except ValueError as e:
                raise _unwrap(e) from None
            except asyncio.CancelledError:
                call.cancel()
                raise
            except WORKER_LOST:  # the prefill replica died: decode computes the prompt itself
                WORKERS_LOST.labels(self.model_name, "prefill").inc()
                span.add_event("prefill worker lost: decode computes the prompt")
                result = None
            finally:
                span.end()
            if result is not None:
                req.kv_handle = result.kv_handle
                if result.document_recompute is not None:  # the assembly as the prefill pool made it
                    req.document_recompute = result.document_recompute
                try:
                    yield result.delta
                except BaseException:
                    if result.kv_handle is not None:  # nobody will pull it: let the owner free it now
                        self.decode.release.remote(result.kv_handle)
                    raise
                if result.delta.finish_reason is not None:
                    return
                req.output_token_ids = list(result.delta.token_ids)
                req.output_logprobs = _copied(result.delta.logprobs)
        span = self._call_span("decode", req, parent)
        try:
            async for delta in self._decode(req, span):
                yield delta
        finally:
            span.end()

    async def _decode(self, req: WorkerRequest, span) -> AsyncIterator[Delta]:
        for attempt in range(self.max_migrations + 1):
            stream = self.decode_stream.generate.remote(req)
            finished = False
            try:
                async for delta in stream:
                    req.output_token_ids.extend(delta.token_ids)  # kept for a migration
                    if req.output_logprobs is not None and delta.logprobs is not None:
                        req.output_logprobs.extend(delta.logprobs)
                    finished = delta.finish_reason is not None
                    yield delta
                    if finished:
                        return
                raise WorkerLostError(
                    f"decode stream for {req.request_id} ended before the sequence finished"
                )
            except ValueError as e:
                raise _unwrap(e) from None
            except WORKER_LOST as e:
                WORKERS_LOST.labels(self.model_name, "decode").inc()
                if attempt == self.max_migrations:
                    raise WorkerLostError(
                        f"request {req.request_id}: no decode worker could finish it "
                        f"after {attempt + 1} attempts: {e}"
                    ) from None
                logger.warning(
                    "decode worker lost for %s after %d tokens; migrating",
                    req.request_id,
                    len(req.output_token_ids),
                )
                REQUEST_MIGRATIONS.labels(self.model_name).inc()
                span.add_event("decode worker lost: migrating", {"tokens_kept": len(req.output_token_ids)})
                req.kv_handle = None  # the resumed request recomputes prompt + tokens so far
                # a fresh id: a replica that only looked dead may still hold the old one
                req.request_id = f"{req.request_id.split('~')[0]}~m{attempt + 1}"
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
            finally:
                if not finished:
                    stream.cancel()


def _copied(logprobs: list[dict[int, float]] | None) -> list[dict[int, float]] | None:
    return None if logprobs is None else list(logprobs)
