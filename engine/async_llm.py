"""AsyncLLM: the engine's step loop on a background thread, requests consumed as async streams.

Only the engine thread touches the engine: other threads submit commands (add, abort) to a queue that the
thread drains before every step, so an abort takes effect at the next step however busy the engine is.
Each request's outputs go to the asyncio queue of the loop that asked for it. A consumer that stops
listening (client disconnect, cancellation) aborts its request, so its blocks are freed at once.

The loop never dies silently: a command whose submitter gave up is skipped, anything that escapes a step
fails every waiting request and is kept as `error`, and `check_health()` (the replica's health check)
raises for a dead loop and for one that has work but has not come round for `stall_timeout_s`.
"""

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.stat_logger import StatLogger

logger = logging.getLogger("ridgeline.engine")
Result = TypeVar("Result")


class EngineDeadError(RuntimeError):
    """The step loop failed; requests in flight receive this instead of hanging."""


class EngineStalledError(EngineDeadError):
    """The step loop has work but has not come round for too long (a hung step)."""


class AsyncLLM:
    def __init__(
        self,
        engine: LLMEngine,
        idle_wait_s: float = 0.05,
        stall_timeout_s: float = 120.0,
        stats_interval_s: float = 10.0,
        name: str = "engine",
    ):
        """stall_timeout_s: how long one turn of the loop (commands + a step) may take while work waits
        before `check_health` calls the engine stalled. stats_interval_s: how often the loop logs the
        engine's throughput and state while it works (engine/stat_logger.py; 0: never), as `name`."""
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s: got {stall_timeout_s}, allowed > 0")
        self.engine = engine
        self.stat_logger = StatLogger(engine, stats_interval_s, name)
        self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread writes
        self._wakeup = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._stopped = False
        self._error: BaseException | None = None
        self.stall_timeout_s = stall_timeout_s
        self._heartbeat = time.monotonic()  # the start of the loop's latest turn
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ridgeline-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        stall_timeout_s: float = 120.0,
        stats_interval_s: float = 10.0,
        name: str = "engine",
        **engine_options,
    ) -> "AsyncLLM":
        return cls(
            LLMEngine.from_pretrained(model, **engine_options),
            stall_timeout_s=stall_timeout_s,
            stats_interval_s=stats_interval_s,
            name=name,
        )

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
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
        **handoff,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes (engine/protocol.py:EngineClient). Bad input
        raises ValueError at once. `slo_class` and `trace_context` are the serving layer's (the engine
        schedules by `priority` and opens no spans). handoff: EngineRequest's disaggregated-serving fields
        (hold_kv, output_token_ids, output_logprobs, kv_computed_tokens), for the workers."""
        request_options = {
            "cache_salt": cache_salt,
            "priority": priority,
            "preemptible": preemptible,
            **handoff,
        }
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}")
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue[RequestOutput | BaseException]()
        if params.structured_output is not None:  # compiled off the engine thread: its add finds it cached
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_output)

        def add() -> None:
            self.engine.add_request(EngineRequest(request_id, prompt, params, stream=True, **request_options))
            self._streams[request_id] = (loop, outputs)

        finished = False
        try:  # a cancellation while the add is queued or running still aborts what it added
            await asyncio.wrap_future(self._submit(add))
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def call(
        self, fn: Callable[[LLMEngine], Result], undo: Callable[[LLMEngine, Result], object] | None = None
    ) -> Result:
        """Run fn(engine) on the engine thread between steps; its result or exception comes back.
        `undo(engine, result)` reverts what fn did when the caller is cancelled after fn ran (or while
        it runs): a reservation or a lease nobody will use is given back at once."""
        done = self.submit(fn)
        if undo is None:
            return await asyncio.wrap_future(done)
        try:
            return await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:

            def revert(f: Future[Result]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.submit(lambda engine: undo(engine, f.result()))

            done.add_done_callback(revert)
            raise

    async def add_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        """Computed into the engine's document cache and pinned there until remove_document."""
        await self.call(lambda engine: engine.add_document(token_ids, cache_salt, pinned=True))

    async def remove_document(self, token_ids: list[int], cache_salt: str | None) -> None:
        await self.call(lambda engine: engine.remove_document(engine.document_key(token_ids, cache_salt)))

    def submit(self, fn: Callable[[LLMEngine], Result]) -> Future[Result]:
        """Thread-safe: fn(engine) runs on the engine thread before its next step."""
        return self._submit(lambda: fn(self.engine))

    @property
    def error(self) -> BaseException | None:
        """Why the step loop died, or None while it runs."""
        return self._error

    def check_health(self) -> None:
        """Raises EngineDeadError if the step loop died, EngineStalledError if it has had work and not come
        round for stall_timeout_s; returns otherwise (Ray Serve replaces a replica whose check raises)."""
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}")
        if not self._thread.is_alive() and not self._stopped:
            raise EngineDeadError("engine step loop exited")
        stalled = time.monotonic() - self._heartbeat
        if stalled > self.stall_timeout_s and (self._streams or not self._commands.empty()):
            raise EngineStalledError(
                f"engine step loop stalled: no turn for {stalled:.0f} s with work waiting "
                f"(limit {self.stall_timeout_s:g} s)"
            )

    def abort(self, request_id: str) -> None:
        """Takes effect before the engine's next step; returns at once."""

        def drop() -> None:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)

        self._submit(drop)

    def num_unfinished(self) -> int:
        """Streams not finished (engine/protocol.py:EngineClient)."""
        return len(self._streams)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _submit(self, command: Callable[[], Result]) -> Future[Result]:
        done: Future[Result] = Future()
        if self._error is not None:
            done.set_exception(EngineDeadError(f"engine step loop failed: {self._error!r}"))
            return done
        self._commands.put((command, done))
        self._wakeup.set()
        if self._error is not None:  # the loop died between the check and the put: nobody will drain it
            self._fail_pending()
        return done

    def _drain_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue  # its submitter gave up before it ran: nobody wants its effect
            try:
                result = command()
            except Exception as e:  # noqa: BLE001 - the submitter decides (ValueError -> HTTP 400)
                done.set_exception(e)
            else:
                done.set_result(result)

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._heartbeat = time.monotonic()
                self._drain_commands()
                self.stat_logger.maybe_log()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(self._idle_wait_s)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it, and health too
            logger.exception("engine step loop failed")
            self._fail_all(e)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # aborted: nobody listens
        if out.finished:
            del self._streams[out.request_id]
        loop, outputs = stream
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody will ever listen
            if self._streams.pop(out.request_id, None) is not None:
                self.engine.abort_request(out.request_id)

    def _fail_all(self, error: BaseException) -> None:
        self._error = error
        dead = EngineDeadError(f"engine step loop failed: {error!r}")
        for loop, outputs in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):  # that consumer's event loop is closed
                loop.call_soon_threadsafe(outputs.put_nowait, dead)
        self._streams.clear()
        self._fail_pending()

    def _fail_pending(self) -> None:
        """Fail every queued command (thread-safe: each future is settled once)."""
        dead = EngineDeadError(f"engine step loop failed: {self._error!r}")
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(dead)
