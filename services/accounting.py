"""A request's cost as its outputs arrive: the engine time each pool reported since the last output
(engine/outputs.py:ComputeUsage), priced by the pool (control_plane/cost.py) and counted in Prometheus by
pool and SLO class — so tokens per dollar is a PromQL ratio, and the usage of the response carries
`cost_usd`."""

from control_plane.cost import PriceList
from engine.outputs import ComputeUsage, RequestOutput
from observability.metrics import COMPUTE_SECONDS, COMPUTE_TOKENS, COST_DOLLARS


class RequestAccount:
    def __init__(self, prices: PriceList, model: str, slo_class: str, default_pool: str):
        """default_pool: the pool of outputs that name none (an engine in this process)."""
        self.prices, self.model, self.slo_class, self.default_pool = prices, model, slo_class, default_pool
        self._seen: dict[str, ComputeUsage] = {}
        self.usd = 0.0
        self.priced = True  # every pool that served it has a price

    def update(self, out: RequestOutput) -> None:
        for pool, usage in (out.compute_by_pool or {self.default_pool: out.compute}).items():
            new = usage - self._seen.get(pool, ComputeUsage())
            if new.prefill_tokens <= 0 and new.decode_tokens <= 0:
                continue
            self._seen[pool] = usage
            seconds = max(new.seconds, 0.0)
            labels = (self.model, pool, self.slo_class)
            COMPUTE_TOKENS.labels(*labels, "prefill").inc(max(new.prefill_tokens, 0))
            COMPUTE_TOKENS.labels(*labels, "decode").inc(max(new.decode_tokens, 0))
            COMPUTE_SECONDS.labels(*labels).inc(seconds)
            if pool not in self.prices:
                self.priced = False
                continue
            usd = max(self.prices.charge(pool, new).usd, 0.0)
            self.usd += usd
            COST_DOLLARS.labels(*labels).inc(usd)
