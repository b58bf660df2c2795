"""make_transport(backend): NIXL over UCX when it is installed and starts, else the Ray object store."""

from services.transport.base import KVTransport
from services.transport.ray_backend import RayTransport

BACKENDS = ("auto", "nixl", "ray")


def make_transport(backend: str = "auto") -> KVTransport:
    """`auto`: NIXL when it imports and starts an agent, else the Ray object store."""
    if backend not in BACKENDS:
        raise ValueError(f"kv_transport: got {backend!r}, allowed {', '.join(BACKENDS)}")
    if backend in ("auto", "nixl"):
        try:
            # optional: the nixl wheel (and UCX) may be missing, and then Ray's object store serves
            from services.transport.nixl_backend import NixlTransport

            return NixlTransport()
        except ImportError:
            if backend == "nixl":
                raise
    return RayTransport()
