"""PrefillWorker: runs a prompt, samples the first token, and holds the prompt's KV under a lease for the
decode worker that will pull it (released by the puller's notification, reclaimed when the lease runs out)."""

import dataclasses
import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout

from engine.async_llm import EngineDeadError
from observability import tracing
from services.engine_worker import EngineWorker
from services.messages.worker import WorkerStats
from services.transport.leases import LeaseTable
from services.worker_protocol import DeltaTracker, PrefillResult, WorkerRequest

logger = logging.getLogger("ridgeline.prefill")


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(
        self,
        model: str,
        engine_options: dict | None = None,
        kv_transport: str = "auto",
        kv_lease_s: float = 30.0,
        lease_poll_s: float = 0.02,
        reap_timeout_s: float = 30.0,
        **worker_options,
    ):
        """worker_options: EngineWorker's (kv_tiers, pool_name, registry). reap_timeout_s: how long the lease
        reaper waits for the engine thread to run a reap before it tries again."""
        super().__init__(model, engine_options, kv_transport, **worker_options)
        self.leases = LeaseTable(kv_lease_s)  # touched only on the engine thread
        self.reap_timeouts = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_loop,
            args=(lease_poll_s, reap_timeout_s),
            daemon=True,
            name="ridgeline-lease-reaper",
        )
        self._reaper.start()

    async def prefill(self, req: WorkerRequest) -> PrefillResult:
        """Bad input raises ValueError before anything is computed."""
        self.counters.requests += 1
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
        last, handed_out = None, False
        try:
            async for out in self.llm.generate(
                req.request_id,
                req.prompt_token_ids,
                first_only,
                hold_kv=True,
                cache_salt=req.cache_salt,
                **req.document_options(),
                priority=req.priority,
                preemptible=req.preemptible,
            ):
                last = out
            assert last is not None  # a stream ends with its finished output
            self.observe_queue_time(last.queued, req.slo_class, span)
            span.set_attribute("ridgeline.cached_tokens", last.num_cached_tokens)
            delta = DeltaTracker(0, self.name, self.pool).delta(last)
            num_tokens = len(req.prompt_token_ids) + 1
            wanted_one = req.params.max_tokens == 1 or num_tokens >= self.engine.max_model_len
            if delta.finish_reason != "length" or wanted_one:  # finished for real: nothing to hand over
                return PrefillResult(delta, None)
            delta.finish_reason = None  # only our max_tokens=1 stopped it
            handle = await self.llm.call(
                lambda e: self._hand_out(e, req.request_id, len(req.prompt_token_ids)), undo=self._take_back
            )
            handed_out = True
            self.counters.kv_handles += 1
            resolved = None
            if req.documents:
                resolved = dataclasses.asdict(self.engine.resolve_recompute(req.document_recompute))
            return PrefillResult(delta, handle, resolved)
        finally:
            if not handed_out:  # finished, failed or cancelled (at any await): the held KV goes back; a
                # command that runs even though this task was cancelled, and a no-op for a running request
                # (the stream's abort frees that one)
                self.llm.submit(lambda e: e.kv_handoff.release(req.request_id))

    def _hand_out(self, engine, request_id: str, num_tokens: int):
        """On the engine thread, in one command (each command is a hop that delays the first token): a
        handle to the held blocks, leased, or freed at once when the transport copied them out. Its
        checksums are a Triton kernel on GPU pools (~0.2 ms per 256 MiB) and CRC32 on host pools."""
        try:
            handle = self.transport.handle(engine.kv_handoff.held(request_id), num_tokens)
        except BaseException:
            engine.kv_handoff.release(request_id)
            raise
        if self.transport.holds_source_blocks:
            self.leases.grant(handle.handle_id, request_id)
        else:
            engine.kv_handoff.release(request_id)
        return handle

    def _take_back(self, engine, handle) -> None:
        """On the engine thread: a handle whose caller went away before it got it is freed now, not when
        its lease runs out."""
        if (lease := self.leases.end(handle.handle_id)) is not None:
            engine.kv_handoff.release(lease.request_id)
            self.counters.kv_leases_released += 1

    def _reap(self, engine) -> None:
        """On the engine thread: free blocks whose handle was released or whose lease ran out."""
        for handle_id in self.transport.take_released():
            if (lease := self.leases.end(handle_id)) is not None:
                engine.kv_handoff.release(lease.request_id)
                self.counters.kv_leases_released += 1
        for lease in self.leases.expired():
            engine.kv_handoff.release(lease.request_id)
            self.counters.kv_leases_reclaimed += 1

    def _reap_loop(self, period_s: float, timeout_s: float) -> None:
        """Runs for the replica's life: a slow engine turn or a failed reap is logged and tried again; only
        a dead engine ends it (and check_health then fails for the engine)."""
        while not self._stop.wait(period_s):
            done = self.llm.submit(self._reap)
            try:
                done.result(timeout=timeout_s)
            except EngineDeadError:
                return
            except FutureTimeout:
                done.cancel()  # still queued: the next turn submits a fresh one
                self.reap_timeouts += 1
                logger.warning("lease reaper: the engine did not run it within %g s; trying again", timeout_s)
            except Exception:  # noqa: BLE001 - logged; the next period tries again
                logger.exception("lease reaper: a reap failed")

    def check_health(self) -> None:
        super().check_health()
        if not self._reaper.is_alive() and not self._stop.is_set():
            raise RuntimeError("the KV lease reaper thread stopped: handed-out KV would never be freed")

    def snapshot(self) -> WorkerStats:
        stats = super().snapshot()
        stats.held_leases = len(self.leases)
        return stats

    def __del__(self):
        self._stop.set()
        super().__del__()
