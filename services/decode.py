"""DecodeWorker: pulls a prompt's KV from the prefill worker that holds it, joins the running batch and
streams tokens. With no handle (aggregated mode, a dead prefill worker, a migrated request) it computes
the prompt itself. A pull that fails or does not verify is retried, then given up for recomputation:
a bad block is never decoded from."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from observability import tracing
from observability.metrics import KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES, KV_TRANSFER_SECONDS
from services.draft import RemoteDrafter
from services.engine_worker import EngineWorker, worker_labels
from services.messages.pools import DraftSettings
from services.transport import KVHandle, TransferError
from services.worker_protocol import Delta, DeltaTracker, WorkerRequest

logger = logging.getLogger("ridgeline.decode")


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(
        self,
        model: str,
        engine_options: dict | None = None,
        kv_transport: str = "auto",
        pull_attempts: int = 3,
        pull_timeout_s: float = 30.0,
        drafts: DraftSettings | None = None,
        **worker_options,
    ):
        """worker_options: EngineWorker's (kv_tiers, pool_name, registry). drafts: speculative decoding
        with a remote draft-model pool (ngram drafting is an engine option)."""
        drafter = None
        if drafts is not None:
            labels = worker_labels(model, self.role, worker_options)
            drafter = RemoteDrafter(drafts.pool_handle, drafts.deadline_s, drafts.wait_s, labels=labels)
        super().__init__(model, engine_options, kv_transport, drafter=drafter, **worker_options)
        self.draft_pool = drafts.pool if drafts is not None else ""
        self.pull_attempts = pull_attempts
        self.pull_timeout_s = pull_timeout_s

    async def generate(self, req: WorkerRequest) -> AsyncIterator[Delta]:
        """Stream deltas of one sequence until it finishes; cancelling the stream aborts it here."""
        self.counters.requests += 1
        span = self.request_span("decode", req)
        try:
            async for delta in self._generate(req, span):
                yield delta
        except BaseException as e:
            if not isinstance(e, GeneratorExit | asyncio.CancelledError):
                span.set_status(tracing.Status(tracing.StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            span.end()

    async def _generate(self, req: WorkerRequest, span) -> AsyncIterator[Delta]:
        computed = 0
        if req.kv_handle is not None:
            transfer = tracing.tracer().start_span(
                "kv_transfer",
                context=trace.set_span_in_context(span),
                attributes={
                    "ridgeline.transport": self.transport.name,
                    "ridgeline.blocks": len(req.kv_handle.block_ids),
                },
            )
            try:
                computed = await self._pull(req)
            finally:
                transfer.set_attribute("ridgeline.kv_tokens", computed)
                transfer.end()
        tracker = DeltaTracker(len(req.output_token_ids), self.name, self.pool, self.draft_pool)
        queued = None
        try:
            async for out in self.llm.generate(
                req.request_id,
                req.prompt_token_ids,
                req.params,
                output_token_ids=req.output_token_ids,
                output_logprobs=req.output_logprobs,
                kv_computed_tokens=computed,
                cache_salt=req.cache_salt,
                # assembled here when the prompt is computed here (aggregated, or its prefill lost); handed-over
                # KV hashes with them as the prefill worker's did
                **req.document_options(),
                priority=req.priority,
                preemptible=req.preemptible,
            ):
                if queued is None and out.queued is not None:
                    queued = out.queued
                    self.observe_queue_time(queued, req.slo_class, span)
                yield tracker.delta(out)
        except BaseException:
            if computed:  # a rejected add leaves the pulled blocks unadopted
                await asyncio.shield(self.llm.call(lambda e: e.kv_handoff.free_reserved(req.request_id)))
            raise

    async def release(self, handle: KVHandle) -> None:
        """Let the owner free a handle nobody will pull (the client went away before decode)."""
        self.transport.release(handle)

    async def _pull(self, req: WorkerRequest) -> int:
        """KV tokens now in this worker's blocks for the request: the handle's, or 0 to recompute. Blocks
        this worker already caches (a shared prefix, an earlier turn) are reused, not pulled."""
        request_id, handle = req.request_id, req.kv_handle
        assert handle is not None  # called for a request that came with a KV handle
        coded = self.transport.local_coded_pools(handle)  # coded blocks go to our pools of their format
        try:  # cancelled meanwhile: the reservation is freed and the owner told to free its blocks
            reserved = await self.llm.call(
                lambda e: e.kv_handoff.reserve(
                    request_id,
                    handle.num_tokens,
                    req.prompt_token_ids,
                    req.cache_salt,
                    coded,
                    req.documents,
                    e.resolve_recompute(req.document_recompute),
                ),
                undo=lambda e, _: e.kv_handoff.free_reserved(request_id),
            )
        except asyncio.CancelledError:
            self.transport.release(handle)
            raise
        if reserved is None:  # memory is short: the scheduler will make room and recompute
            self.transport.release(handle)
            self.counters.kv_recomputes += 1
            return 0
        skip = reserved.num_cached_blocks
        rest, into = handle.tail(skip), reserved.block_ids[skip:]
        self.counters.kv_blocks_reused += skip
        labels = {**self.metric_labels, "transport": self.transport.name}
        for attempt in range(1, self.pull_attempts + 1):
            start = time.perf_counter()
            try:
                if rest.block_ids:
                    await _uncancellable(
                        asyncio.to_thread(self.transport.pull, rest, into, self.pull_timeout_s)
                    )
            except TransferError as e:
                self.counters.kv_pull_failures += 1
                KV_TRANSFER_FAILURES.labels(**labels).inc()
                logger.warning("KV pull %d/%d for %s failed: %s", attempt, self.pull_attempts, request_id, e)
                if not e.retryable:  # the owner is gone: recompute now rather than ask again
                    break
                continue
            except BaseException:
                await asyncio.shield(self._give_up(request_id, handle))
                raise
            self.transport.release(handle)
            self.counters.kv_pulls += 1
            self.counters.kv_pull_bytes += rest.num_bytes
            self.counters.kv_blocks_converted += self.transport.converted_blocks_of(rest, into)
            if rest.block_ids:
                KV_TRANSFER_SECONDS.labels(**labels).observe(time.perf_counter() - start)
                KV_TRANSFER_BYTES.labels(**labels).inc(rest.num_bytes)
            return handle.num_tokens
        await self._give_up(request_id, handle)
        self.counters.kv_recomputes += 1
        return 0

    async def _give_up(self, request_id: str, handle: KVHandle) -> None:
        self.transport.release(handle)
        await self.llm.call(lambda e: e.kv_handoff.free_reserved(request_id))


async def _uncancellable(coro) -> None:
    """Await coro to the end even if we are cancelled (a transfer still writing into reserved blocks must
    finish before they are freed), then re-raise the cancellation."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
