"""Shared by the tests that run the Ray Serve app."""

import time

import ray

MODEL = "tiny-llama"
ENGINE = {"num_blocks": 128, "max_model_len": 256}
POOL = {"num_cpus": 0.25, "engine": ENGINE}


def app_config(model: str, **overrides) -> dict:
    # admission control off unless a test is about it: on a loaded 2-core CI machine a burst can predict a
    # wait beyond the default class's 2 s target and be answered 429, which other tests do not expect
    return {
        "model": model,
        "served_model_name": MODEL,
        "prefill": POOL,
        "decode": POOL,
        "frontend_num_cpus": 0.25,
        "admission": False,
        **overrides,
    }


def pool_stats(app: str, deployment: str, replicas: int, timeout: float = 30.0) -> dict[str, dict]:
    """Every live replica's snapshot, by replica name. Asks each replica actor directly (Serve names them
    SERVE_REPLICA::app#deployment#id and exposes record_routing_stats), so a busy replica is reached too."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    seen: dict[str, dict] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            try:
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                stats = ray.get(actor.record_routing_stats.remote(), timeout=timeout)
            except Exception:  # noqa: BLE001 - a replica that is dying or starting is not counted
                continue
            if stats:
                seen[stats["replica"]] = stats
    assert len(seen) >= replicas, f"only {len(seen)} of {replicas} {deployment} replicas answered"
    return seen


def wait_pools_idle(app: str, deployments: dict[str, int], timeout: float = 30.0) -> dict[str, dict]:
    """Bounded wait until every replica has no request and every KV block free; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {d: pool_stats(app, d, n) for d, n in deployments.items()}
        busy = [
            (d, s)
            for d, by in stats.items()
            for s in by.values()
            if s["unfinished"] or s["kv_free_blocks"] != s["kv_total_blocks"] or s.get("held_leases")
        ]
        if not busy:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"pools not idle: {busy}")
        time.sleep(0.2)


@ray.remote(num_cpus=0)
class TierWorker:
    """An engine worker (services/engine_worker.py) in its own Ray actor, driven request by request. The
    actor's process starts and imports the engine first; start() builds the worker in it, so a test can have
    the process up before the moment its worker is to be built."""

    def __init__(self):
        import services.engine_worker  # noqa: F401 - the imports, ahead of start()
        import services.messages.pools  # noqa: F401

    def start(self, model: str, engine: dict, kv_tiers: dict, kv_transport: str = "nixl") -> None:
        from services.engine_worker import EngineWorker
        from services.messages.pools import TierSettings

        self.worker = EngineWorker(
            model, engine, kv_transport=kv_transport, kv_tiers=TierSettings(**kv_tiers)
        )

    async def run(self, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], int]:
        """Greedy output token ids, and how many prompt tokens the engine computed for them."""
        from engine.sampling_params import SamplingParams

        engine = self.worker.engine
        before = engine.stats.prompt_tokens_computed
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        final = None
        async for out in self.worker.llm.generate(self.worker.llm.new_request_id(), prompt, params):
            final = out
        return final.outputs[0].token_ids, engine.stats.prompt_tokens_computed - before

    def flush(self) -> None:
        self.worker.engine.offloader.drain()
        self.worker.kv_store.flush()

    def stats(self) -> dict:
        return self.worker.snapshot().to_dict()

    def close(self) -> None:
        self.worker.__del__()
