"""The embedded registry for `ridgeline serve` without etcd: control_plane's MemoryRegistry inside one
detached Ray actor per cluster (restarted empty if it dies; the workers then register again), and a client
with the Registry interface. `connector(url)` gives what Registration and RegistryView need for either
backend: a function that makes a client on the calling thread's event loop."""

import contextlib
from collections.abc import AsyncIterator, Callable

import ray
import ray.exceptions

from control_plane.registry import Registry, RegistryUnavailable, WatchEvent, parse_url
from control_plane.registry_etcd import open_registry
from control_plane.registry_memory import MemoryRegistry

ACTOR_NAME = "ridgeline-registry"
NAMESPACE = "ridgeline"
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class RegistryActor:
    def __init__(self):
        self.store = MemoryRegistry()

    async def call(self, method: str, *args):
        return await getattr(self.store, method)(*args)

    async def events_since(self, prefix: str, start_revision: int, timeout_s: float):
        return await self.store.events_since(prefix, start_revision, timeout_s)


def _actor():
    return RegistryActor.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class ActorRegistry(Registry):
    def __init__(self, actor=None):
        self.actor = actor or _actor()

    async def _call(self, method: str, *args):
        try:
            return await self.actor.call.remote(method, *args)
        except _LOST as e:
            raise RegistryUnavailable(f"embedded registry actor: {e}") from None

    async def grant(self, ttl_s: float) -> int:
        return await self._call("grant", ttl_s)

    async def refresh(self, lease: int) -> bool:
        return await self._call("refresh", lease)

    async def revoke(self, lease: int) -> None:
        await self._call("revoke", lease)

    async def put(self, key: str, value: dict, lease: int | None = None) -> None:
        try:
            await self._call("put", key, value, lease)
        except ray.exceptions.RayTaskError as e:  # a lease the (restarted) actor does not know
            raise RegistryUnavailable(str(e.cause if hasattr(e, "cause") else e)) from None

    async def delete(self, key: str) -> None:
        await self._call("delete", key)

    async def get_prefix(self, prefix: str) -> tuple[dict[str, dict], int]:
        return await self._call("get_prefix", prefix)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        while True:
            try:
                events, start_revision = await self.actor.events_since.remote(prefix, start_revision, 2.0)
            except _LOST as e:
                raise RegistryUnavailable(f"embedded registry actor: {e}") from None
            except ray.exceptions.RayTaskError as e:  # history trimmed: the caller lists again
                raise RegistryUnavailable(str(e)) from None
            for event in events:
                yield event


def connector(url: str) -> Callable[[], Registry]:
    """What membership threads call to make their client: etcd, or the embedded actor."""
    kind, _, _ = parse_url(url)
    if kind == "etcd":
        return lambda: open_registry(url)
    actor = _actor()  # made here, once: the handle works from any thread or loop
    return lambda: ActorRegistry(actor)


def shutdown_registry() -> None:
    """Remove the embedded registry actor (`ridgeline serve` on exit)."""
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE))
