"""What a client sees of one request, as the frontend's metrics (observability/metrics.py): time to first
token, inter-token latency, time per output token, end-to-end latency, tokens, the outcome, and whether the
request met its SLO class's targets; and the end of the request's trace span (observability/tracing.py)
with its GenAI usage attributes; and one log line when it ends (id, pools, tokens, TTFT, outcome). Times run
from the moment the frontend received the request."""

import logging
import time
from collections.abc import Callable

from control_plane.slo import SLOClass
from engine.outputs import RequestOutput
from observability.metrics import (
    E2E,
    GENERATION_TOKENS,
    ITL,
    PROMPT_TOKENS,
    REQUESTS,
    REQUESTS_IN_FLIGHT,
    SLO_MET,
    TPOT,
    TTFT,
)
from observability.tracing import Status, StatusCode

logger = logging.getLogger("ridgeline.requests")


def count_outcome(model: str, slo_class: str, outcome: str) -> None:
    """A request that ended before it was served (invalid, rejected, unavailable)."""
    REQUESTS.labels(model, slo_class, outcome).inc()


class RequestRecord:
    def __init__(
        self,
        model: str,
        slo: SLOClass,
        received: float,
        span=None,
        on_finish: Callable[[], None] | None = None,
        request_id: str | None = None,
        pool: str | None = None,
    ):
        """received: time.perf_counter() when the frontend got the request; span: its trace span, ended here;
        on_finish: called once when the request ends, however it ends. request_id, pool: for the log line
        (the pools the outputs' compute came from win over `pool`)."""
        self.model, self.slo, self.received, self.span = model, slo, received, span
        self.on_finish = on_finish
        self.request_id, self.pool = request_id, pool
        self.last_output: RequestOutput | None = None
        self.labels = (model, slo.name)
        self.first_token_at: float | None = None
        self.last_at = received
        self.tokens = 0
        self.done = False
        REQUESTS_IN_FLIGHT.labels(model).inc()

    def output(self, out: RequestOutput) -> None:
        """Each output as the frontend consumes it (cumulative, as the engine clients give them)."""
        self.last_output = out
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - self.tokens
        if new <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            TTFT.labels(*self.labels).observe(now - self.received)
            new -= 1  # the first token's latency is TTFT, not an inter-token gap
        for _ in range(new):
            ITL.labels(*self.labels).observe((now - self.last_at) / max(new, 1))
        self.tokens, self.last_at = tokens, now

    def finish(self, out: RequestOutput | None, outcome: str) -> None:
        """outcome: stop | length (served), aborted (client gone), error. Idempotent."""
        if self.done:
            return
        self.done = True
        if self.on_finish is not None:
            self.on_finish()
        self._log(out or self.last_output, outcome)
        REQUESTS_IN_FLIGHT.labels(self.model).dec()
        REQUESTS.labels(*self.labels, outcome).inc()
        if self.span is not None:
            self._end_span(out, outcome)
        if out is None or outcome not in ("stop", "length"):
            return
        e2e = self.last_at - self.received
        E2E.labels(*self.labels).observe(e2e)
        PROMPT_TOKENS.labels(*self.labels).inc(len(out.prompt_token_ids))
        GENERATION_TOKENS.labels(*self.labels).inc(self.tokens)
        ttft = (self.first_token_at or self.last_at) - self.received
        tpot = None
        if self.tokens > 1:
            tpot = (e2e - ttft) / (self.tokens - 1)
            TPOT.labels(*self.labels).observe(tpot)
        if ttft * 1000 <= self.slo.ttft_ms and (tpot is None or tpot * 1000 <= self.slo.tpot_ms):
            SLO_MET.labels(*self.labels).inc()

    def _log(self, out: RequestOutput | None, outcome: str) -> None:
        """One line per request: INFO, WARNING when it failed (its cause is logged where it was caught)."""
        request_id = self.request_id or (out.request_id if out is not None else "-")
        by_pool = out.compute_by_pool if out is not None else {}
        pool = "+".join(by_pool) if by_pool else self.pool or "-"  # where it ran, else where it was sent
        ttft = "-" if self.first_token_at is None else f"{self.first_token_at - self.received:.3f}s"
        logger.log(
            logging.WARNING if outcome == "error" else logging.INFO,
            "request %s: %s, pool %s, prompt tokens %s, output tokens %d, TTFT %s, e2e %.3fs, slo_class %s",
            request_id,
            outcome,
            pool,
            len(out.prompt_token_ids) if out is not None else "-",
            self.tokens,
            ttft,
            time.perf_counter() - self.received,
            self.slo.name,
        )

    def _end_span(self, out: RequestOutput | None, outcome: str) -> None:
        span = self.span
        span.set_attribute("ridgeline.outcome", outcome)
        span.set_attribute("gen_ai.usage.output_tokens", self.tokens)
        if out is not None:
            span.set_attribute("gen_ai.usage.input_tokens", len(out.prompt_token_ids))
            span.set_attribute("gen_ai.response.finish_reasons", [c.finish_reason or "" for c in out.outputs])
        if self.first_token_at is not None:
            span.set_attribute("ridgeline.ttft_s", self.first_token_at - self.received)
        if outcome == "error":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()


def outcome_of(out: RequestOutput) -> str:
    """stop unless any choice ran out of length (an aborted choice makes it aborted)."""
    reasons = {c.finish_reason for c in out.outputs}
    return "aborted" if "abort" in reasons else "length" if "length" in reasons else "stop"
