"""Draft workers: a small draft model on CPUs proposes tokens that the decode GPU verifies (speculative
decoding; engine/spec/verify.py keeps the output distribution exact).

`DraftWorker` is a Ray Serve deployment holding the draft model in an engine on CPU (torch threads = its
CPUs; its prefix cache keeps each request's context, so a proposal computes only the new tokens) and
answers batches of (context, k) with k greedy tokens each. `RemoteDrafter` is the decode worker's engine-
side drafter: each step it hands the decoding requests' contexts to a background thread that asks the pool,
and uses the proposals that have come back and still fit the request (the request may have moved on by the
accepted tokens: the part of a proposal it already produced is dropped). With `wait_s` = 0 (pipelined) a
step never waits: drafts computed while the GPU stepped are used if still on the request's path. With
`wait_s` > 0 a step waits up to that long for the proposals of its own contexts (vLLM-style synchronous
drafting, every step drafted while the pool keeps up). A proposal older than the deadline, a slow call or a
dead draft worker just means no drafts for a while.
"""

import logging
import threading
import time

import torch

from engine.llm_engine import LLMEngine
from engine.outputs import ComputeUsage
from engine.request import Request
from engine.spec.draft_model import DraftModelDrafter
from engine.spec.drafter import Drafter
from observability.metrics import DRAFT_LATENCY
from services import ray_hardening
from services.messages.worker import ModelInfo

ray_hardening.install()  # before Serve starts this replica's inter-deployment gRPC server

logger = logging.getLogger("ridgeline.draft")
CHARGE_TTL_S = 60.0  # a charge no step picked up in this long belongs to a request that has finished


class DraftWorker:
    def __init__(self, model: str, engine_options: dict | None = None, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        draft = LLMEngine.from_pretrained(
            model, **{"device": "cpu", "enable_prefix_caching": True, **(engine_options or {})}
        )
        self.drafter = DraftModelDrafter(draft)

    async def info(self) -> ModelInfo:
        engine = self.drafter.engine
        return ModelInfo(max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size)

    async def propose(self, jobs: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[ComputeUsage]]:
        """jobs: (token ids so far, how many to draft) -> greedy continuations, and this worker's engine time on
        each (charged to the requests at the draft pool's price)."""
        return self.drafter.propose_with_usage(jobs)


class RemoteDrafter(Drafter):
    name = "draft_model"

    def __init__(
        self,
        handle,
        deadline_s: float = 0.5,
        wait_s: float = 0.0,
        retry_after_s: float = 5.0,
        labels: dict | None = None,
    ):
        """handle: a Serve handle to the DraftWorker deployment (one call per step's batch)."""
        if wait_s < 0 or wait_s > deadline_s:
            raise ValueError(f"wait_s: got {wait_s}; allowed 0 <= wait_s <= deadline_s ({deadline_s})")
        self.handle, self.deadline_s, self.wait_s, self.retry_after_s = (
            handle,
            deadline_s,
            wait_s,
            retry_after_s,
        )
        self.labels = labels or {}
        self._lock = threading.Condition()
        self._pending: dict[str, tuple[list[int], int]] | None = None  # the latest batch not sent yet
        self._ready: dict[str, tuple[int, list[int], float]] = {}  # request -> (context length, drafts, when)
        # draft workers' time per request not yet on the request: (usage, when last charged)
        self._charges: dict[str, tuple[ComputeUsage, float]] = {}
        self._down_until = 0.0
        self._sent = self._done = 0  # batches handed to the loop / calls it has finished (or failed)
        self.stats = {"calls": 0, "failures": 0, "late": 0, "stale": 0, "used": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ridgeline-drafter", daemon=True)
        self._thread.start()

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        return self.propose_batch([request], [num_tokens])[0]

    def propose_batch(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        with self._lock:
            jobs = {
                r.request_id: (r.token_ids(0, r.num_tokens), k)
                for r, k in zip(requests, num_tokens, strict=True)
                if k > 0
            }
            if jobs and time.monotonic() >= self._down_until:
                self._pending = jobs
                self._sent += 1
                self._lock.notify_all()
                if self.wait_s > 0:
                    sent = self._sent
                    self._lock.wait_for(lambda: self._done >= sent, timeout=self.wait_s)
            now = time.monotonic()
            out = [self._usable(req, k, now) for req, k in zip(requests, num_tokens, strict=True)]
            for req in requests:  # the engine's thread owns the requests: charges move onto them here
                if (charge := self._charges.pop(req.request_id, None)) is not None:
                    req.draft_compute = req.draft_compute + charge[0]
            # a request that finished before its last call came back is not charged for that call
            self._charges = {rid: c for rid, c in self._charges.items() if now - c[1] <= CHARGE_TTL_S}
            # proposals past their deadline are never used: drop them (also those of finished requests)
            self._ready = {rid: e for rid, e in self._ready.items() if now - e[2] <= self.deadline_s}
            return out

    def _usable(self, req: Request, k: int, now: float) -> list[int]:
        entry = self._ready.pop(req.request_id, None)
        if entry is None or k <= 0:
            return []
        length, drafts, when = entry
        if now - when > self.deadline_s:
            self.stats["late"] += 1
            return []
        moved = req.num_tokens - length  # tokens the request produced since this context was sent
        if moved < 0 or req.token_ids(length, req.num_tokens) != drafts[:moved]:
            self.stats["stale"] += 1
            return []
        self.stats["used"] += 1
        return drafts[moved : moved + k]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                batch, self._pending, seq = self._pending, None, self._sent
            assert batch is not None  # woken with a batch pending, or stopped
            ids = list(batch)
            start = time.monotonic()
            try:
                drafts, usage = self.handle.propose.remote([batch[i] for i in ids]).result(
                    timeout_s=self.deadline_s
                )
            except Exception as e:  # noqa: BLE001 - slow or dead draft workers: decode goes on without drafts
                self.stats["failures"] += 1
                logger.warning(
                    "draft call failed (%s): no drafts for %.0f s", type(e).__name__, self.retry_after_s
                )
                with self._lock:
                    self._down_until = time.monotonic() + self.retry_after_s
                    self._done = self._sent
                    self._lock.notify_all()
                continue
            took = time.monotonic() - start
            self.stats["calls"] += 1
            if self.labels:
                DRAFT_LATENCY.labels(**self.labels).observe(took)
            done = time.monotonic()
            with self._lock:
                for request_id, proposal, spent in zip(ids, drafts, usage, strict=True):
                    if proposal:
                        self._ready[request_id] = (len(batch[request_id][0]), proposal, done)
                    self._charges[request_id] = (
                        self._charges.get(request_id, (ComputeUsage(), 0.0))[0] + spent,
                        done,
                    )
                self._done = seq
                self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
