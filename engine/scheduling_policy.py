"""Scheduling policies: the order in which requests get tokens, and who is preempted first."""

from abc import ABC, abstractmethod

from engine.request import Request


class SchedulingPolicy(ABC):
    """Orders requests. `key` smaller = served first; the running request with the largest key is the
    first preemption victim. `may_preempt_for(a, b)` says whether waiting request `a` may evict running `b`.
    """

    name: str

    @abstractmethod
    def key(self, request: Request) -> tuple: ...

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return False


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; `priority` is ignored."""

    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` value first (vLLM's convention), then arrival. A waiting request may preempt a
    running one of strictly lower priority that is `preemptible` when blocks or batch slots run out."""

    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return waiting.priority < running.priority and running.preemptible


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FCFSPolicy, PriorityPolicy)}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy: got {name!r}, allowed {sorted(POLICIES)}")
    return POLICIES[name]()
