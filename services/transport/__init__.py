"""KV transports: `nixl` (NIXL over UCX) and `ray` (the object store), behind one interface
(base.py); services/transport/factory.py picks one."""

from services.transport.base import KVHandle, KVLayout, KVTransport, TransferError

__all__ = ["KVHandle", "KVLayout", "KVTransport", "TransferError"]
