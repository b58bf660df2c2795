"""The registry on etcd v3 through aetcd: leases with TTLs, keys under leases, list + watch by revision.
Connection failures become RegistryUnavailable (the caller retries); aetcd reconnects by itself."""

import contextlib
from collections.abc import AsyncIterator

import aetcd
import aetcd.exceptions

from control_plane.registry import Registry, RegistryUnavailable, WatchEvent, decode, encode, parse_url

_UNAVAILABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.RevisionCompactedError,
    aetcd.exceptions.InternalError,
)


class EtcdRegistry(Registry):
    def __init__(self, host: str, port: int, timeout_s: float = 3.0):
        self.host, self.port = host, port
        self._client = aetcd.Client(host, port, timeout=timeout_s)

    def _lost(self, e: Exception) -> RegistryUnavailable:
        return RegistryUnavailable(f"etcd at {self.host}:{self.port}: {type(e).__name__}: {e}")

    async def grant(self, ttl_s: float) -> int:
        try:
            return (await self._client.lease(max(1, round(ttl_s)))).id
        except _UNAVAILABLE as e:
            raise self._lost(e) from None

    async def refresh(self, lease: int) -> bool:
        try:
            reply = await self._client.refresh_lease(lease)
        except _UNAVAILABLE as e:
            raise self._lost(e) from None
        return reply is not None and reply.TTL > 0  # etcd answers TTL 0 for a lease it no longer has

    async def revoke(self, lease: int) -> None:
        try:
            await self._client.revoke_lease(lease)
        except _UNAVAILABLE as e:
            raise self._lost(e) from None
        except aetcd.exceptions.ClientError:  # already gone
            pass

    async def put(self, key: str, value: dict, lease: int | None = None) -> None:
        try:
            await self._client.put(key.encode(), encode(value), lease=lease)
        except _UNAVAILABLE as e:
            raise self._lost(e) from None

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete(key.encode())
        except _UNAVAILABLE as e:
            raise self._lost(e) from None

    async def get_prefix(self, prefix: str) -> tuple[dict[str, dict], int]:
        try:
            result = await self._client.get_prefix(prefix.encode())
        except _UNAVAILABLE as e:
            raise self._lost(e) from None
        return {kv.key.decode(): decode(kv.value) for kv in result}, result.header.revision

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        try:
            watch = await self._client.watch_prefix(prefix.encode(), start_revision=start_revision)
        except _UNAVAILABLE as e:
            raise self._lost(e) from None
        try:
            async for event in watch:
                key = event.kv.key.decode()
                if event.kind == "PUT":
                    yield WatchEvent("put", key, decode(event.kv.value), event.kv.mod_revision)
                else:
                    yield WatchEvent("delete", key, None, event.kv.mod_revision)
        except _UNAVAILABLE as e:
            raise self._lost(e) from None
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await watch.cancel()

    async def close(self) -> None:
        await self._client.close()


def open_registry(url: str) -> Registry:
    """A client for `etcd://HOST:PORT`; the embedded registry is opened by services/registry_actor.py."""
    kind, host, port = parse_url(url)
    if kind != "etcd" or host is None or port is None:
        raise ValueError("registry: 'embedded' lives in a Ray actor (services.registry_actor.connector)")
    return EtcdRegistry(host, port)
