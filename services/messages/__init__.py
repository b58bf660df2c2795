"""Every payload that crosses a role or a package, as a small typed class (mini-sglang's message/ package):
a renamed field fails at once instead of being read as None two packages away.

- kv_feed.py: a worker's KV events, in its routing stats for the KV-aware routers
- worker.py: a worker's model limits, counters and stats (routing stats, /stats), its registration in the registry
- pools.py: a pool as the registry and /v1/pools describe it; a worker's KV tier and draft settings
- kv_memory.py: what the node's KV memory service tells its clients (identity, layout, shared-memory pool)
The KV handle is services/transport/base.py:KVHandle; requests and deltas between the frontend and the
workers are services/worker_protocol.py.
"""
