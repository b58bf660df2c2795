"""Drive a server with a workload: open loop (arrivals at a rate, whatever the server does) or closed loop
(N users, each sending its next request when the last one ends); bounded by a request count and/or a
duration; results collected as they finish into a `Run`, so an interrupted run still has them.

A chat conversation is one arrival: its turns go one after another, each with the whole history including
the previous answers."""

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from benchmarks.loadgen import arrivals
from benchmarks.loadgen.arrivals import PROCESSES
from benchmarks.loadgen.client import RequestResult, Target, send
from benchmarks.loadgen.workloads import RequestSpec


@dataclass
class Load:
    rate: float | None = None  # requests (conversations) per second; None with concurrency: closed loop
    arrivals: str = "poisson"
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop users; with a rate: a cap on requests in flight
    requests: int | None = None
    duration_s: float | None = None
    warmup_s: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("requests, duration: give at least one bound")
        if self.rate is None and self.concurrency is None:
            raise ValueError("rate, concurrency: give a rate (open loop) or a concurrency (closed loop)")
        if self.arrivals not in PROCESSES:
            raise ValueError(f"arrivals: got {self.arrivals!r}, allowed {', '.join(PROCESSES)}")
        for name in ("rate", "duration_s", "requests", "concurrency", "burstiness"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: got {value}, allowed > 0")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s: got {self.warmup_s}, allowed >= 0")


@dataclass
class Run:
    results: list[RequestResult] = field(default_factory=list)
    started: float = 0.0  # time.perf_counter() at the start
    wall_s: float = 0.0
    interrupted: bool = False

    def measured(self, warmup_s: float) -> list[RequestResult]:
        return [r for r in self.results if r.start >= warmup_s]

    def window_s(self, warmup_s: float) -> float:
        """From the end of warm-up to the last measured request's end (or to now if none ended)."""
        ends = [r.start + (r.e2e_s or 0.0) for r in self.measured(warmup_s)]
        return max(max(ends, default=self.wall_s), self.wall_s if self.interrupted else 0.0) - warmup_s


def _units(specs: Iterator[RequestSpec]) -> Iterator[list[RequestSpec]]:
    """Arrivals: a single request, or all turns of one chat conversation."""
    specs = iter(specs)
    pending = next(specs, None)
    while pending is not None:
        unit = [pending]
        pending = next(specs, None)
        while (
            pending is not None
            and unit[0].conversation is not None
            and pending.conversation == unit[0].conversation
        ):
            unit.append(pending)
            pending = next(specs, None)
        yield unit


async def _serve_unit(
    client: httpx.AsyncClient,
    target: Target,
    unit: list[RequestSpec],
    run: Run,
    on_result: Callable[[RequestResult], None],
) -> None:
    history: list[dict] = []
    for spec in unit:
        messages = None
        if spec.messages is not None:
            history = history + spec.messages
            messages = history
        result = await send(
            client,
            target,
            prompt=spec.prompt,
            messages=messages,
            max_tokens=spec.max_tokens,
            slo_class=spec.slo_class,
            run_start=run.started,
            documents=spec.documents,
        )
        run.results.append(result)
        on_result(result)
        if not result.ok:
            return  # a conversation stops at its first failure
        if messages is not None:
            history = history + [{"role": "assistant", "content": result.text}]


async def run_load(
    target: Target,
    load: Load,
    specs: Iterator[RequestSpec],
    run: Run,
    on_result: Callable[[RequestResult], None] = lambda r: None,
) -> Run:
    """Fill `run` (which the caller keeps: after Ctrl-C it holds what finished)."""
    load.check()
    units = _units(specs)
    if load.requests is not None:
        units = itertools.islice(units, load.requests)
    run.started = time.perf_counter()
    deadline = None if load.duration_s is None else run.started + load.duration_s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    tasks: set[asyncio.Task] = set()
    try:
        async with httpx.AsyncClient(limits=limits) as client:
            if load.rate is None:  # closed loop
                lock = asyncio.Lock()

                async def user() -> None:
                    while deadline is None or time.perf_counter() < deadline:
                        async with lock:
                            unit = next(units, None)
                        if unit is None:
                            return
                        await _serve_unit(client, target, unit, run, on_result)

                tasks = {asyncio.create_task(user()) for _ in range(load.concurrency)}
            else:
                cap = asyncio.Semaphore(load.concurrency) if load.concurrency else None
                gaps, next_at = (
                    arrivals.gaps(load.arrivals, load.rate, load.seed, load.burstiness),
                    run.started,
                )

                async def capped(unit: list[RequestSpec]) -> None:
                    if cap is None:
                        return await _serve_unit(client, target, unit, run, on_result)
                    async with cap:
                        await _serve_unit(client, target, unit, run, on_result)

                for unit in units:
                    arrival = unit[0].arrival
                    next_at = run.started + arrival if arrival is not None else next_at + next(gaps)
                    if deadline is not None and next_at > deadline:
                        break
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    tasks.add(asyncio.create_task(capped(unit)))
                    tasks = {t for t in tasks if not t.done()}
            if tasks:
                await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        run.interrupted = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        run.wall_s = time.perf_counter() - run.started
    return run
