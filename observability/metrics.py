"""Every Prometheus metric Ridgeline exports, named `ridgeline_*` with the unit in the name.

Each process exports its own registry; the frontend's `/metrics` serves the frontend process's metrics.
"""

from prometheus_client import Counter

REQUEST_MIGRATIONS = Counter(
    "ridgeline_request_migrations_total",
    "Sequences resumed on another decode replica after theirs died (tokens already streamed kept)")
WORKERS_LOST = Counter(
    "ridgeline_worker_lost_total", "Calls that met a dead worker replica", ["role"])
ROUTER_DECISIONS = Counter(
    "ridgeline_router_decisions_total", "Replica choices for prompts, by policy and by the fastest tier that "
    "held the chosen replica's cached prefix (none: it computes the whole prompt)", ["policy", "tier"])
ROUTER_MATCHED_BLOCKS = Counter(
    "ridgeline_router_matched_blocks_total", "Prompt blocks the chosen replica already held, by tier",
    ["policy", "tier"])
ROUTER_PROMPT_BLOCKS = Counter(
    "ridgeline_router_prompt_blocks_total", "Full prompt blocks routed (the denominator of the hit rate)",
    ["policy"])
ADMISSION_REJECTED = Counter(
    "ridgeline_admission_rejected_total", "Requests rejected with 429 because their class's TTFT target "
    "could not be met (control_plane/admission.py)", ["model", "slo_class"])
COST_DOLLARS = Counter(
    "ridgeline_cost_dollars_total", "Dollars of engine time spent on requests (step time x the pool's "
    "price, split over the step's tokens)", ["model", "pool", "slo_class"])
COMPUTE_TOKENS = Counter(
    "ridgeline_compute_tokens_total", "Tokens the engines computed for requests, prompt (prefill) and "
    "generated-position (decode) apart", ["model", "pool", "slo_class", "kind"])
COMPUTE_SECONDS = Counter(
    "ridgeline_compute_seconds_total", "Engine step seconds spent on requests", ["model", "pool", "slo_class"])
