"""The prefill worker's lease reaper outlives a slow engine: it used to exit on its first 10 s timeout, after
which no handed-out KV was ever freed (102 leases, 633 blocks held)."""

import asyncio
import threading
import time

from engine.sampling_params import SamplingParams
from services.prefill import PrefillWorker
from services.worker_protocol import WorkerRequest


def test_the_reaper_survives_a_stalled_engine_and_frees_leases_after(llama):
    worker = PrefillWorker(
        llama, {"num_blocks": 64}, kv_transport="ray", kv_lease_s=0.5, lease_poll_s=0.02, reap_timeout_s=0.1
    )
    try:
        engine, release = worker.engine, threading.Event()
        step = engine.step

        def slow_step():  # one step that takes ten reaper timeouts
            release.wait(1.0)
            engine.step = step
            return step()

        engine.step = slow_step
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        first_only = SamplingParams(temperature=0, max_tokens=1)  # nothing to hand over: no transport at work
        result = asyncio.run(worker.prefill(WorkerRequest("first", [5] * 40, first_only)))
        assert result.kv_handle is None and worker.reap_timeouts >= 3
        worker.check_health()  # the reaper is alive

        async def hold():  # KV held under a lease, as a handle of a transport that reads remotely leaves it
            async for _ in worker.llm.generate("held", [6] * 40, params, hold_kv=True):
                pass
            await worker.llm.call(lambda e: worker.leases.grant("h-held", "held"))

        asyncio.run(hold())
        assert len(worker.leases) == 1
        deadline = (
            time.monotonic() + 10
        )  # nobody pulls it: the lease runs out and the reaper frees the blocks
        while len(worker.leases) or engine.block_manager.num_free_blocks != engine.block_manager.num_blocks:
            assert time.monotonic() < deadline, "the lease was never reclaimed"
            time.sleep(0.05)
        assert worker.counters.kv_leases_reclaimed == 1
    finally:
        worker.__del__()
