"""Leases on held KV blocks: released when the puller says so, reclaimed when nobody came in time."""

import time
from dataclasses import dataclass


@dataclass
class Lease:
    handle_id: str
    request_id: str
    deadline: float


class LeaseTable:
    def __init__(self, ttl_s: float, clock=time.monotonic):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: got {ttl_s}, allowed > 0")
        self.ttl_s = ttl_s
        self.clock = clock
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, handle_id: str, request_id: str) -> Lease:
        lease = Lease(handle_id, request_id, self.clock() + self.ttl_s)
        self._leases[handle_id] = lease
        return lease

    def end(self, handle_id: str) -> Lease | None:
        """The lease for a released handle, removed; None if unknown or already ended."""
        return self._leases.pop(handle_id, None)

    def expired(self) -> list[Lease]:
        """Leases past their deadline, removed."""
        now = self.clock()
        gone = [lease for lease in self._leases.values() if lease.deadline <= now]
        for lease in gone:
            del self._leases[lease.handle_id]
        return gone
