"""PrefillWorker: runs a prompt, samples the first token, and holds the prompt's KV under a lease for the
decode worker that will pull it (released by the puller's notification, reclaimed when the lease runs out)."""

import dataclasses
import threading

from observability import tracing
from services.engine_worker import EngineWorker
from services.transport.leases import LeaseTable
from services.worker_protocol import DeltaTracker, PrefillResult, WorkerRequest


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, model: str, engine_options: dict | None = None, kv_transport: str = "auto",
                 kv_lease_s: float = 30.0, lease_poll_s: float = 0.02, **worker_options):
        """worker_options: EngineWorker's (kv_tiers, pool_name, registry)."""
        super().__init__(model, engine_options, kv_transport, **worker_options)
        self.leases = LeaseTable(kv_lease_s)  # touched only on the engine thread
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, args=(lease_poll_s,), daemon=True,
                                        name="ridgeline-lease-reaper")
        self._reaper.start()

    async def prefill(self, req: WorkerRequest) -> PrefillResult:
        """Bad input raises ValueError before anything is computed."""
        self.counters["requests"] += 1
        span = self.request_span("prefill", req)
        try:
            return await self._prefill(req, span)
        except BaseException as e:
            span.set_status(tracing.Status(tracing.StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            span.end()

    async def _prefill(self, req: WorkerRequest, span) -> PrefillResult:
        first_only = dataclasses.replace(req.params, max_tokens=1)
        last = None
        async for out in self.llm.generate(req.request_id, req.prompt_token_ids, first_only, hold_kv=True,
                                           cache_salt=req.cache_salt, priority=req.priority,
                                           preemptible=req.preemptible):
            last = out
        self.observe_queue_time(last.queued, req.slo_class, span)
        span.set_attribute("ridgeline.cached_tokens", last.num_cached_tokens)
        delta = DeltaTracker(0, self.name, self.pool).delta(last)
        num_tokens = len(req.prompt_token_ids) + 1
        wanted_one = req.params.max_tokens == 1 or num_tokens >= self.engine.max_model_len
        if delta.finish_reason != "length" or wanted_one:  # finished for real: nothing to hand over
            await self.llm.call(lambda e: e.release_kv(req.request_id))
            return PrefillResult(delta, None)
        delta.finish_reason = None  # only our max_tokens=1 stopped it
        handle = await self.llm.call(lambda e: self._hand_out(e, req.request_id, len(req.prompt_token_ids)))
        self.counters["kv_handles"] += 1
        return PrefillResult(delta, handle)

    def _hand_out(self, engine, request_id: str, num_tokens: int):
        """On the engine thread, in one command (each command is a hop that delays the first token): a
        handle to the held blocks, leased, or freed at once when the transport copied them out. Its
        checksums are a Triton kernel on GPU pools (~0.2 ms per 256 MiB) and CRC32 on host pools."""
        try:
            handle = self.transport.handle(engine.held_kv(request_id), num_tokens)
        except BaseException:
            engine.release_kv(request_id)
            raise
        if self.transport.holds_source_blocks:
            self.leases.grant(handle.handle_id, request_id)
        else:
            engine.release_kv(request_id)
        return handle

    def _reap(self, engine) -> None:
        """On the engine thread: free blocks whose handle was released or whose lease ran out."""
        for handle_id in self.transport.take_released():
            if (lease := self.leases.end(handle_id)) is not None:
                engine.release_kv(lease.request_id)
                self.counters["kv_leases_released"] += 1
        for lease in self.leases.expired():
            engine.release_kv(lease.request_id)
            self.counters["kv_leases_reclaimed"] += 1

    def _reap_loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            done = self.llm.submit(self._reap)
            try:
                done.result(timeout=10)
            except Exception:  # noqa: BLE001 - a dead engine: nothing left to free
                return

    def snapshot(self) -> dict:
        return {**super().snapshot(), "held_leases": len(self.leases)}

    def __del__(self):
        self._stop.set()
        super().__del__()
