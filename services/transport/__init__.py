"""KV transports: `nixl` (NIXL over UCX) and `ray` (the object store), behind one interface."""

from services.transport.base import KVHandle, KVLayout, KVTransport, TransferError

BACKENDS = ("auto", "nixl", "ray")


def make_transport(backend: str = "auto") -> KVTransport:
    """`auto`: NIXL when it imports and starts an agent, else the Ray object store."""
    if backend not in BACKENDS:
        raise ValueError(f"kv_transport: got {backend!r}, allowed {', '.join(BACKENDS)}")
    if backend in ("auto", "nixl"):
        try:
            from services.transport.nixl_backend import NixlTransport

            return NixlTransport()
        except ImportError:
            if backend == "nixl":
                raise
    from services.transport.ray_backend import RayTransport

    return RayTransport()


__all__ = ["BACKENDS", "KVHandle", "KVLayout", "KVTransport", "TransferError", "make_transport"]
