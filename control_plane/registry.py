"""The registry: where workers, pools and their configuration are found. One interface, two backends —
etcd (control_plane/registry_etcd.py, for clusters) and an in-memory store (control_plane/registry_memory.py),
which `ridgeline serve` runs inside a Ray actor when no etcd is given (services/registry_actor.py).

Keys are strings, values JSON objects. A key written under a lease disappears when the lease is not
refreshed within its TTL: that is how a dead worker leaves the registry. `get_prefix` returns the store's
revision, and `watch` yields the changes after a revision, so a reader can list and then follow without
missing anything. Key layout (`keys`): /ridgeline/<app>/pools/<pool> and /ridgeline/<app>/workers/<pool>/<replica>.
No torch, no Ray.
"""

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlparse


class RegistryUnavailable(ConnectionError):
    """The registry cannot be reached (or lost the history a watch asked for): list again later."""


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    key: str
    value: dict | None  # None for a delete
    revision: int


class Registry(ABC):
    @abstractmethod
    async def grant(self, ttl_s: float) -> int:
        """A new lease id; keys put under it vanish `ttl_s` after its last refresh."""

    @abstractmethod
    async def refresh(self, lease: int) -> bool:
        """Extend a lease by its TTL; False when the registry no longer knows it (it lapsed)."""

    @abstractmethod
    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys."""

    @abstractmethod
    async def put(self, key: str, value: dict, lease: int | None = None) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def get_prefix(self, prefix: str) -> tuple[dict[str, dict], int]:
        """Every key under `prefix` with its value, and the revision they were read at."""

    @abstractmethod
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` from `start_revision` on, until cancelled; RegistryUnavailable on loss."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


def encode(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict:
    return json.loads(raw)


class keys:  # noqa: N801 - a namespace of key builders
    ROOT = "/ridgeline"

    @staticmethod
    def app(app: str) -> str:
        return f"{keys.ROOT}/{app}/"

    @staticmethod
    def pool(app: str, pool: str) -> str:
        return f"{keys.ROOT}/{app}/pools/{pool}"

    @staticmethod
    def workers(app: str) -> str:
        return f"{keys.ROOT}/{app}/workers/"

    @staticmethod
    def worker(app: str, pool: str, replica: str) -> str:
        return f"{keys.ROOT}/{app}/workers/{pool}/{replica}"


def parse_url(url: str) -> tuple[str, str | None, int | None]:
    """("embedded", None, None) or ("etcd", host, port); ValueError naming `registry` otherwise."""
    if url == "embedded":
        return "embedded", None, None
    parsed = urlparse(url)
    if parsed.scheme != "etcd" or not parsed.hostname or parsed.path not in ("", "/"):
        raise ValueError(f"registry: got {url!r}, allowed 'embedded' or 'etcd://HOST:PORT'")
    try:
        port = parsed.port or 2379
    except ValueError:
        raise ValueError(f"registry: port in {url!r} is not a number in 1..65535") from None
    return "etcd", parsed.hostname, port
