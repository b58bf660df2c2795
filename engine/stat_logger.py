"""The console: an engine's throughput and state logged every few seconds while it works, as vLLM prints
them, and `configure_logging`, which puts Ridgeline's log lines on stderr at a level (the CLI process and
every Ray replica call it)."""

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.llm_engine import LLMEngine

logger = logging.getLogger("ridgeline.stats")

LOG_LEVELS = ("debug", "info", "warning", "error")
# the loggers of our packages: "ridgeline.*" by convention, a few by module name (__name__)
_OUR_LOGGERS = ("ridgeline", "engine", "services", "control_plane", "observability")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's last-resort handler does); a
    class of its own, so that configuring again finds it instead of adding another."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@dataclass(frozen=True)
class ConsoleConfig:
    """What a process prints: the level of our loggers, and how often an engine logs its stats (0: never)."""

    log_level: str = "info"
    stats_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level: got {self.log_level!r}, allowed {', '.join(LOG_LEVELS)}")
        if self.stats_interval_s < 0:
            raise ValueError(f"stats_interval_s: got {self.stats_interval_s}, allowed >= 0 (0: off)")


def configure_logging(level: str = "info") -> None:
    """Our loggers at `level` (debug, info, warning, error), written to stderr with a timestamp. Calling it
    again changes the level; it never adds a second handler. Records still propagate (to pytest's capture,
    or to whatever the host application set up)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level: got {level!r}, allowed {', '.join(LOG_LEVELS)}")
    for name in _OUR_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(level.upper())
        if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
            handler = _ConsoleHandler()
            handler.setFormatter(logging.Formatter(_FORMAT))
            log.addHandler(handler)
        log.propagate = not _root_writes_to_a_terminal()


def _root_writes_to_a_terminal() -> bool:
    """Whether the root logger already prints to stderr/stdout (basicConfig): then ours would print twice."""
    return any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        for h in logging.getLogger().handlers
    )


@dataclass
class _Counters:
    at: float
    prompt_tokens: int
    generated_tokens: int
    lookup_blocks: int
    hit_blocks: int


class StatLogger:
    """Logs, every `interval_s` (0: never), the engine's average prompt and generation throughput since the
    last line, its running and waiting requests, KV cache usage and the prefix cache hit rate of the prompts
    admitted since the last line. Called by the engine loop on every turn (`maybe_log`, on the engine
    thread); it stays quiet while the engine is idle, after one line that shows it went idle."""

    def __init__(
        self,
        engine: LLMEngine,
        interval_s: float = 10.0,
        name: str = "engine",
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval_s < 0:
            raise ValueError(f"stats_interval_s: got {interval_s}, allowed >= 0 (0: off)")
        self.engine, self.interval_s, self.name, self.clock = engine, interval_s, name, clock
        self._last = self._read()
        self._was_busy = False

    def _read(self) -> _Counters:
        stats, sched = self.engine.stats, self.engine.scheduler
        return _Counters(
            self.clock(),
            stats.prompt_tokens_computed,
            stats.generated_tokens,
            sched.prefix_lookup_blocks,
            sched.prefix_hit_blocks,
        )

    def maybe_log(self) -> str | None:
        """The line logged, if one was due and the engine had work since the last; else None."""
        if not self.interval_s or self.clock() - self._last.at < self.interval_s:
            return None
        now = self._read()
        line, busy = self._line(self._last, now)
        self._last = now
        if not (busy or self._was_busy):
            return None
        self._was_busy = busy
        logger.info("%s", line)
        return line

    def _line(self, before: _Counters, now: _Counters) -> tuple[str, bool]:
        seconds = max(now.at - before.at, 1e-9)
        prompt = now.prompt_tokens - before.prompt_tokens
        generated = now.generated_tokens - before.generated_tokens
        lookups = now.lookup_blocks - before.lookup_blocks
        hit_rate = (now.hit_blocks - before.hit_blocks) / lookups if lookups else 0.0
        sched = self.engine.scheduler
        running, waiting = len(sched.running), len(sched.waiting) + sched.num_loading
        line = (
            f"{self.name}: Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
            f"Avg generation throughput: {generated / seconds:.1f} tokens/s, "
            f"Running: {running} reqs, Waiting: {waiting} reqs, "
            f"KV cache usage: {self.engine.block_manager.usage:.1%}, "
            f"Prefix cache hit rate: {hit_rate:.1%}"
        )
        return line, bool(prompt or generated or running or waiting)
