"""Which tiers a block may live in, by the priority of the request that last used it (lower value = more
important; SLO classes map onto priorities). Eviction order inside HBM is the engine's FreeBlockQueue
(least important first); this policy decides how far down an evicted block may go before it is dropped."""

from dataclasses import dataclass, field

from control_plane.tiers import TIERS


@dataclass(frozen=True)
class TierPolicy:
    lowest_tier: dict[int, str] = field(default_factory=dict)  # priority -> lowest tier allowed
    default_lowest: str = "ssd"

    def __post_init__(self) -> None:
        for priority, tier in [*self.lowest_tier.items(), (None, self.default_lowest)]:
            if tier not in TIERS:
                raise ValueError(f"lowest_tier[{priority}]: got {tier!r}, allowed {', '.join(TIERS)}")

    def allows(self, priority: int, tier: str) -> bool:
        lowest = self.lowest_tier.get(priority, self.default_lowest)
        return TIERS.index(tier) <= TIERS.index(lowest)
