"""Membership on top of the registry, each running on its own thread and event loop so it keeps time
whatever the owner's loop is doing:

- Registration keeps one key alive under a lease (heartbeat every TTL/3) and writes it again, under a
  new lease, whenever the registry lost it (lease lapsed, registry restarted empty, or unreachable for
  longer than the TTL).
- RegistryView mirrors everything under a prefix (list, then watch from that revision; list again on any
  error and every `resync_s`). While the registry is unreachable it keeps the last known state.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from control_plane.registry import Registry, WatchEvent

logger = logging.getLogger("ridgeline.registry")

_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


def _backoff(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row."""
    return _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]


class _LoopThread:
    """A daemon thread running `main()` on its own event loop until stop()."""

    def __init__(self, name: str):
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.main()), name=self._name, daemon=True)
        self._thread.start()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when stopping."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, deadline - time.monotonic()))
        return not self._stop.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def main(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


class Registration(_LoopThread):
    def __init__(
        self,
        connect: Callable[[], Registry],
        key: str,
        value: dict,
        ttl_s: float = 10.0,
        on_registered: Callable[[], None] | None = None,
    ):
        """connect() makes the registry client (called on this thread's loop). on_registered runs (on this
        thread) after each (re-)registration: a re-registered worker's readers start over from a snapshot."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: got {ttl_s}, allowed > 0")
        super().__init__(f"ridgeline-registration-{key.rsplit('/', 1)[-1]}")
        self.connect, self.key, self.value, self.ttl_s = connect, key, dict(value), ttl_s
        self.on_registered = on_registered
        self.lease: int | None = None
        self.registrations = 0  # how many times the key was (re-)written under a fresh lease
        self.errors = 0

    @property
    def registered(self) -> bool:
        return self.lease is not None

    async def main(self) -> None:
        registry = self.connect()
        failures = 0
        try:
            while not self.stopping:
                try:
                    if self.lease is None or not await registry.refresh(self.lease):
                        await self._register(registry)
                    failures = 0
                    wait = self.ttl_s / 3
                except Exception as e:  # noqa: BLE001 - unreachable registry: keep trying, never die
                    self.errors += 1
                    if failures == 0:
                        logger.warning("registry: %s: %s (retrying)", self.key, e)
                    wait = _backoff(failures)
                    failures += 1
                if not await self.sleep(wait):
                    break
            if self.lease is not None:  # leaving cleanly: vanish now rather than at the TTL
                with contextlib.suppress(Exception):  # else the TTL will do it
                    await asyncio.wait_for(registry.revoke(self.lease), 2.0)
        finally:
            await registry.close()

    async def _register(self, registry: Registry) -> None:
        self.lease = None
        lease = await registry.grant(self.ttl_s)
        value = {**self.value, "registered_at": time.time(), "lease": lease}
        await registry.put(self.key, value, lease=lease)
        self.lease = lease
        self.registrations += 1
        if self.on_registered is not None:
            self.on_registered()


class RegistryView(_LoopThread):
    def __init__(self, connect: Callable[[], Registry], prefix: str, resync_s: float = 5.0):
        super().__init__(f"ridgeline-registry-view{prefix.replace('/', '-')}")
        self.connect, self.prefix, self.resync_s = connect, prefix, resync_s
        self._items: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.connected = False
        self.errors = 0

    def items(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._items)

    def under(self, sub: str) -> dict[str, dict]:
        """Entries whose key starts with prefix + sub, keyed by the rest of the key."""
        start = self.prefix + sub
        return {k[len(start) :]: v for k, v in self.items().items() if k.startswith(start)}

    def _apply(self, event: WatchEvent) -> None:
        with self._lock:
            if event.kind == "put" and event.value is not None:
                self._items[event.key] = event.value
            else:
                self._items.pop(event.key, None)

    async def main(self) -> None:
        registry = self.connect()
        failures = 0
        try:
            while not self.stopping:
                try:
                    items, revision = await registry.get_prefix(self.prefix)
                    with self._lock:
                        self._items = dict(items)
                    self.connected, failures = True, 0
                    await self._follow(registry, revision + 1)
                except Exception as e:  # noqa: BLE001 - keep the last known state, list again soon
                    self.errors += 1
                    if self.connected:
                        logger.warning("registry view %s: %s (keeping the last known state)", self.prefix, e)
                    self.connected = False
                    if not await self.sleep(_backoff(failures)):
                        break
                    failures += 1
        finally:
            await registry.close()

    async def _follow(self, registry: Registry, start_revision: int) -> None:
        """Apply watch events until `resync_s` passes (then list again), the watch fails (raised), or stop."""
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()

        async def pump() -> None:
            async for event in registry.watch(self.prefix, start_revision):
                await queue.put(event)

        task = asyncio.create_task(pump())
        deadline = time.monotonic() + self.resync_s
        try:
            while not self.stopping and time.monotonic() < deadline:
                if queue.empty() and task.done():
                    task.result()  # the watch's error, if it failed
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), 0.1)
                except TimeoutError:
                    continue
                self._apply(event)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
