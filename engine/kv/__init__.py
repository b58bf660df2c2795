"""The paged KV cache: the pool tensor (pool.py), blocks and the prefix cache (block_manager.py,
free_block_queue.py, block_hash.py), the events workers publish about them (events.py), and offload to and
load from lower tiers (offload.py)."""
