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
