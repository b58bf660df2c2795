"""Every Prometheus metric Ridgeline exports, named `ridgeline_*` with the unit in the name.

Each process exports its own registry; the frontend's `/metrics` serves the frontend process's metrics.
"""

from prometheus_client import Counter

REQUEST_MIGRATIONS = Counter(
    "ridgeline_request_migrations_total",
    "Sequences resumed on another decode replica after theirs died (tokens already streamed kept)")
WORKERS_LOST = Counter(
    "ridgeline_worker_lost_total", "Calls that met a dead worker replica", ["role"])
