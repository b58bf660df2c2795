"""The embedded registry: the same semantics as etcd (leases with TTLs, revisions, list + watch) in memory,
for `ridgeline serve` without etcd (services/registry_actor.py hosts it in a Ray actor) and for one process.
Lapsed leases are swept on every call and while watchers wait, so a dead worker's key goes within its TTL."""

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator

from control_plane.registry import Registry, RegistryUnavailable, WatchEvent


class MemoryRegistry(Registry):
    def __init__(self, history: int = 4096, clock=time.monotonic):
        self.clock = clock
        self.revision = 1
        self._data: dict[str, tuple[dict, int | None]] = {}  # key -> (value, lease)
        self._leases: dict[int, tuple[float, float]] = {}  # lease -> (ttl, deadline)
        self._log: deque[WatchEvent] = deque(maxlen=history)
        self._ids = itertools.count(1)
        self._changed: asyncio.Condition | None = None  # made in the loop that first waits

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _record(self, kind: str, key: str, value: dict | None) -> None:
        self.revision += 1
        self._log.append(WatchEvent(kind, key, value, self.revision))

    def _expire(self) -> bool:
        now = self.clock()
        lapsed = [lease for lease, (_, deadline) in self._leases.items() if deadline <= now]
        for lease in lapsed:
            self._end(lease)
        return bool(lapsed)

    def _end(self, lease: int) -> None:
        del self._leases[lease]
        for key in [k for k, (_, owner) in self._data.items() if owner == lease]:
            del self._data[key]
            self._record("delete", key, None)

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def grant(self, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: got {ttl_s}, allowed > 0")
        lease = next(self._ids)
        self._leases[lease] = (ttl_s, self.clock() + ttl_s)
        return lease

    async def refresh(self, lease: int) -> bool:
        if self._expire():
            await self._notify()
        if lease not in self._leases:
            return False
        ttl, _ = self._leases[lease]
        self._leases[lease] = (ttl, self.clock() + ttl)
        return True

    async def revoke(self, lease: int) -> None:
        if lease in self._leases:
            self._end(lease)
            await self._notify()

    async def put(self, key: str, value: dict, lease: int | None = None) -> None:
        self._expire()
        if lease is not None and lease not in self._leases:
            raise ValueError(f"lease: {lease} is not granted or has lapsed")
        self._data[key] = (value, lease)
        self._record("put", key, value)
        await self._notify()

    async def delete(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self._record("delete", key, None)
            await self._notify()

    async def get_prefix(self, prefix: str) -> tuple[dict[str, dict], int]:
        if self._expire():
            await self._notify()
        return {k: v for k, (v, _) in self._data.items() if k.startswith(prefix)}, self.revision

    async def events_since(
        self, prefix: str, start_revision: int, timeout_s: float
    ) -> tuple[list[WatchEvent], int]:
        """Events under `prefix` with revision >= start_revision, waiting up to `timeout_s` for one; and the
        revision to continue from. RegistryUnavailable when that history is no longer kept."""
        cond = self._condition()
        deadline = self.clock() + timeout_s
        async with cond:
            while True:
                self._expire()
                if len(self._log) == self._log.maxlen and start_revision < self._log[0].revision:
                    raise RegistryUnavailable(f"revision {start_revision} is no longer kept: list again")
                events = [e for e in self._log if e.revision >= start_revision and e.key.startswith(prefix)]
                now = self.clock()
                if events or now >= deadline:
                    return events, max(start_revision, self.revision + 1)
                next_expiry = min((d for _, d in self._leases.values()), default=deadline)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait(), max(0.0, min(deadline, next_expiry) - now) + 0.001)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        while True:
            events, start_revision = await self.events_since(prefix, start_revision, timeout_s=5.0)
            for event in events:
                yield event
