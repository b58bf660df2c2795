"""SLO classes: what a request is promised (TTFT and TPOT targets), how it is scheduled (engine priority:
lower runs first and may preempt higher), how far down its KV may go (lowest tier), whether it may be
preempted, and how many recent tokens it keeps at full precision in a pool with a KV age policy. A request names its class with the `x-slo-class` header, or with the body field `priority`
(the class with that priority); neither means `standard`. No torch, no Ray."""

import math
from dataclasses import dataclass

from control_plane.tiers import TIERS


class SLOClassError(ValueError):
    """A request's class cannot be resolved; `parameter` is the field or header that named it."""

    def __init__(self, parameter: str, detail: str):
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter


@dataclass(frozen=True)
class SLOClass:
    name: str
    priority: int
    ttft_ms: float
    tpot_ms: float
    lowest_tier: str = "ssd"
    preemptible: bool = True
    kv_window: int | None = None  # recent tokens kept at full precision by a KV age policy (None: the pool's)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"slo class name: got {self.name!r}, allowed letters, digits, - and _")
        if self.priority < 0:
            raise ValueError(f"slo class {self.name}: priority {self.priority}, allowed >= 0")
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError(f"slo class {self.name}: ttft_ms and tpot_ms must be > 0")
        if self.kv_window is not None and (
            isinstance(self.kv_window, bool) or not isinstance(self.kv_window, int) or self.kv_window < 1
        ):
            raise ValueError(f"slo class {self.name}: kv_window {self.kv_window!r}, allowed an integer >= 1")
        if self.lowest_tier not in TIERS:
            raise ValueError(
                f"slo class {self.name}: lowest_tier {self.lowest_tier!r}, allowed {', '.join(TIERS)}"
            )


class SLOTable:
    def __init__(self, classes: list[SLOClass], default: str = "standard"):
        names = [c.name for c in classes]
        priorities = [c.priority for c in classes]
        if len(set(names)) != len(names) or len(set(priorities)) != len(priorities):
            raise ValueError(
                f"slo classes: names and priorities must be unique, got {list(zip(names, priorities, strict=True))}"
            )
        self.by_name = {c.name: c for c in classes}
        self.by_priority = {c.priority: c for c in classes}
        if default not in self.by_name:
            raise ValueError(f"slo default: {default!r} is not one of {', '.join(names)}")
        self.default = self.by_name[default]

    def resolve(self, header: str | None, priority: int | None) -> SLOClass:
        """The class of a request: the `x-slo-class` header, else the body `priority`, else the default.
        ValueError (naming the field and what is allowed) for an unknown class or priority, or a mismatch."""
        by_header = None
        if header is not None:
            by_header = self.by_name.get(header.strip().lower())
            if by_header is None:
                raise SLOClassError("x-slo-class", f"got {header!r}, allowed {', '.join(self.by_name)}")
        by_priority = None
        if priority is not None:
            by_priority = self.by_priority.get(priority)
            if by_priority is None:
                allowed = ", ".join(f"{p} ({c.name})" for p, c in sorted(self.by_priority.items()))
                raise SLOClassError("priority", f"got {priority}, allowed {allowed}")
        if by_header is not None and by_priority is not None and by_header is not by_priority:
            raise SLOClassError(
                "priority", f"{priority} is class {by_priority.name}, but x-slo-class says {by_header.name}"
            )
        return by_header or by_priority or self.default

    def inflight_limit(self, slo: SLOClass, max_inflight: int) -> int:
        """How many requests may be in flight when one of `slo` arrives: the whole cap for the highest
        class, a quarter less for each class below it (at least a quarter), so a flood of a lower class
        leaves room for the higher ones."""
        rank = sorted(self.by_priority).index(slo.priority)
        return math.ceil(max_inflight * max(0.25, 1.0 - 0.25 * rank))

    def lowest_tiers(self) -> dict[int, str]:
        """priority -> lowest KV tier allowed (services/kv_memory/tier_policy.py takes it)."""
        return {c.priority: c.lowest_tier for c in self.by_name.values()}

    def kv_windows(self) -> dict[int, int]:
        """priority -> the recent tokens its requests keep at full precision, for the classes that say."""
        return {c.priority: c.kv_window for c in self.by_name.values() if c.kv_window is not None}


DEFAULT_SLO_TABLE = SLOTable(
    [
        SLOClass(
            "interactive",
            priority=0,
            ttft_ms=500,
            tpot_ms=50,
            lowest_tier="ssd",
            preemptible=False,
            kv_window=2048,
        ),
        SLOClass("standard", priority=1, ttft_ms=2000, tpot_ms=100, lowest_tier="ssd"),
        SLOClass("batch", priority=2, ttft_ms=60_000, tpot_ms=1000, lowest_tier="ssd"),
    ]
)
