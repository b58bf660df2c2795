"""Every Prometheus metric Ridgeline exports: `ridgeline_*`, the unit in the name (`_seconds`, `_bytes`,
`_blocks`, `_dollars`, `_total` for counters), labels `model`, `pool`, `role`, `slo_class` (and `tier`,
`transport`, `kind`, `outcome` where they apply).

Where they are counted: the frontend (the ingress replica) counts what a client sees — requests by
outcome, TTFT, TPOT, inter-token latency, end-to-end latency, tokens, cost, admission, routing. Each worker
replica counts what its engine does — queue time, running and waiting requests, preemptions, KV blocks
per tier, hits and moves, KV transfers — in its own process.

One scrape target per app: the frontend's `/metrics` serves its own registry plus the `ridgeline_*`
families of every worker replica of the app, fetched over Ray at scrape time, each sample labelled with
its `replica` (observability/aggregate.py). A replica that restarts starts its counters from zero under a
new `replica` label, which rate() handles. We chose this over Ray's metrics export so that one URL has the
whole app and a test can check every series against a real Prometheus.
"""

from prometheus_client import Counter, Gauge, Histogram

# latency buckets: 1 ms .. 2 min (TTFT of a queued batch request), and per-token ones for TPOT/ITL
_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 120)
_TOKEN_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_TRANSFER_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

FRONTEND = ["model", "slo_class"]
WORKER = ["model", "pool", "role"]

# -- the frontend: what clients see --------------------------------------------------------------------
REQUESTS = Counter(
    "ridgeline_requests_total",
    "Requests answered, by outcome: stop or length (finished), aborted (client "
    "went away), rejected (429, admission), invalid (4xx), error (5xx or a stream that failed)",
    [*FRONTEND, "outcome"],
)
REQUESTS_IN_FLIGHT = Gauge("ridgeline_requests_in_flight", "Requests the frontend is serving now", ["model"])
TTFT = Histogram(
    "ridgeline_time_to_first_token_seconds",
    "Request arrival to its first token",
    FRONTEND,
    buckets=_LATENCY_S,
)
TPOT = Histogram(
    "ridgeline_time_per_output_token_seconds",
    "Per request: (end-to-end - TTFT) / (tokens - 1)",
    FRONTEND,
    buckets=_TOKEN_S,
)
ITL = Histogram(
    "ridgeline_inter_token_latency_seconds",
    "Time between consecutive token arrivals of a stream",
    FRONTEND,
    buckets=_TOKEN_S,
)
E2E = Histogram(
    "ridgeline_e2e_request_latency_seconds", "Request arrival to its last token", FRONTEND, buckets=_LATENCY_S
)
PROMPT_TOKENS = Counter("ridgeline_prompt_tokens_total", "Prompt tokens of finished requests", FRONTEND)
GENERATION_TOKENS = Counter(
    "ridgeline_generation_tokens_total", "Tokens generated for finished requests", FRONTEND
)
SLO_MET = Counter(
    "ridgeline_slo_met_requests_total",
    "Finished requests that met both their class's TTFT and TPOT targets",
    FRONTEND,
)
ADMISSION_REJECTED = Counter(
    "ridgeline_admission_rejected_total",
    "Requests rejected with 429 because their class's TTFT target "
    "could not be met (control_plane/admission.py)",
    FRONTEND,
)
COST_DOLLARS = Counter(
    "ridgeline_cost_dollars_total",
    "Dollars of engine time spent on requests (step time x the pool's price, split over the step's tokens)",
    ["model", "pool", "slo_class"],
)
COMPUTE_TOKENS = Counter(
    "ridgeline_compute_tokens_total",
    "Tokens the engines computed for requests, prompt (prefill) and generated-position (decode) apart",
    ["model", "pool", "slo_class", "kind"],
)
COMPUTE_SECONDS = Counter(
    "ridgeline_compute_seconds_total", "Engine step seconds spent on requests", ["model", "pool", "slo_class"]
)
POOL_PRICE = Gauge("ridgeline_pool_price_dollars_per_hour", "A pool's price per replica", ["model", "pool"])
POOL_REPLICAS = Gauge(
    "ridgeline_pool_live_replicas",
    "A pool's replicas registered and alive now (the registry)",
    ["model", "pool"],
)
REQUEST_MIGRATIONS = Counter(
    "ridgeline_request_migrations_total",
    "Sequences resumed on another decode replica after theirs died (tokens already streamed kept)",
    ["model"],
)
WORKERS_LOST = Counter(
    "ridgeline_worker_lost_total", "Calls that met a dead worker replica", ["model", "role"]
)
ROUTER_DECISIONS = Counter(
    "ridgeline_router_decisions_total",
    "Replica choices for prompts, by policy and by the fastest tier that "
    "held the chosen replica's cached prefix (none: it computes the whole prompt)",
    ["policy", "tier"],
)
ROUTER_MATCHED_BLOCKS = Counter(
    "ridgeline_router_matched_blocks_total",
    "Prompt blocks the chosen replica already held, by tier",
    ["policy", "tier"],
)
ROUTER_PROMPT_BLOCKS = Counter(
    "ridgeline_router_prompt_blocks_total",
    "Full prompt blocks routed (the denominator of the hit rate)",
    ["policy"],
)

# -- the workers: what engines do (observability/worker_metrics.py reads engine state at scrape time) ----
QUEUE_TIME = Histogram(
    "ridgeline_request_queue_time_seconds",
    "Arrival at a worker's engine to its first scheduled step",
    [*WORKER, "slo_class"],
    buckets=_LATENCY_S,
)
KV_TRANSFER_BYTES = Counter(
    "ridgeline_kv_transfer_bytes_total", "KV bytes pulled from another worker", [*WORKER, "transport"]
)
KV_TRANSFER_SECONDS = Histogram(
    "ridgeline_kv_transfer_seconds",
    "One verified KV pull (a request's blocks)",
    [*WORKER, "transport"],
    buckets=_TRANSFER_S,
)
KV_TRANSFER_FAILURES = Counter(
    "ridgeline_kv_transfer_failures_total",
    "KV pulls that failed or did not verify (retried, then recomputed)",
    [*WORKER, "transport"],
)
DRAFT_LATENCY = Histogram(
    "ridgeline_spec_draft_latency_seconds",
    "One call to the draft workers for a decode step's batch of proposals",
    WORKER,
    buckets=_TRANSFER_S,
)
# engine state, exported by a collector in each worker (names listed here so this module stays the index):
#   ridgeline_num_requests_running, ridgeline_num_requests_waiting, ridgeline_preemptions_total,
#   ridgeline_engine_busy_seconds_total, ridgeline_engine_steps_total,
#   ridgeline_kv_capacity_blocks{tier}, ridgeline_kv_used_blocks{tier},
#   ridgeline_kv_lookup_blocks_total, ridgeline_kv_hit_blocks_total{tier},
#   ridgeline_kv_moved_bytes_total{tier,direction},
#   ridgeline_spec_draft_tokens_total, ridgeline_spec_accepted_tokens_total, ridgeline_spec_verifications_total,
#   ridgeline_kv_format_{capacity,used}_blocks{kv_dtype}, ridgeline_kv_format_used_bytes{kv_dtype},
#   ridgeline_kv_saved_bytes, ridgeline_kv_aged_blocks_total, ridgeline_kv_format_tier_blocks{tier,kv_dtype},
#   ridgeline_document_lookups_total{outcome}, ridgeline_document_tokens_total{kind},
#   ridgeline_document_fallbacks_total, ridgeline_document_cache_blocks
ENGINE_GAUGES = {
    "ridgeline_num_requests_running": "Requests in the engine's running batch",
    "ridgeline_num_requests_waiting": "Requests waiting to be scheduled (incl. preempted)",
    "ridgeline_kv_capacity_blocks": "KV blocks a tier can hold",
    "ridgeline_kv_used_blocks": "KV blocks a tier holds now (HBM: allocated to requests or cached)",
    "ridgeline_engine_info": "1 per engine, labelled with its formats: weight_dtype (fp8 or a dtype), kv_dtype",
    "ridgeline_kv_format_capacity_blocks": "HBM KV blocks by format: the pool's (kv_dtype) and a KV age "
    "policy's low-bit one (turboquantN)",
    "ridgeline_kv_format_used_blocks": "HBM KV blocks in use by format",
    "ridgeline_kv_format_used_bytes": "HBM KV bytes in use by format",
    "ridgeline_document_cache_blocks": "KV blocks the document cache holds (RAG documents at canonical positions)",
    "ridgeline_kv_saved_bytes": "HBM bytes the low-bit blocks in use save against holding them in the pool's "
    "format",
    "ridgeline_kv_format_tier_blocks": "Coded KV blocks a DRAM or SSD tier holds, by format (a KV age "
    "policy's coded pools have tiers of their own)",
}
ENGINE_COUNTERS = {
    "ridgeline_preemptions": "Requests preempted (recomputed later) to make room",
    "ridgeline_engine_busy_seconds": "Wall time of engine steps that computed tokens",
    "ridgeline_engine_steps": "Engine steps that computed tokens",
    "ridgeline_kv_lookup_blocks": "Full prompt blocks looked up in the KV cache at admission",
    "ridgeline_kv_hit_blocks": "Prompt blocks found in a tier instead of computed (hbm: prefix cache; "
    "dram/ssd: loaded from the tier)",
    "ridgeline_kv_moved_bytes": "KV bytes moved between HBM and a lower tier (direction: offload, load)",
    "ridgeline_spec_draft_tokens": "Drafted tokens verified (speculative decoding proposals)",
    "ridgeline_spec_accepted_tokens": "Drafted tokens accepted",
    "ridgeline_kv_aged_blocks": "KV blocks a KV age policy re-encoded into the low-bit pool",
    "ridgeline_document_lookups": "Prompt documents looked up in the document cache: hit (in HBM), tier_hit "
    "(loaded from DRAM or SSD) or miss (computed into it)",
    "ridgeline_document_tokens": "Document tokens of assembled prompts: reused from the document cache, or "
    "recomputed in place (the recompute selection)",
    "ridgeline_document_fallbacks": "Prompts whose documents found no room in the document cache (computed as "
    "plain prompts)",
    "ridgeline_spec_verifications": "Verifications (a request's drafts checked in one step); accepted / "
    "verifications is the mean accepted length",
}
