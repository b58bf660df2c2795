"""No open door in a Serve replica: Ray Serve 2.60 starts an inter-deployment gRPC server in every replica,
bound to every interface ([::]:0), whose handlers unpickle the request metadata before any check. Anyone
who can reach the port runs code in the replica, with no API key.

Ridgeline never sends a request over it: deployment handles pass requests by reference through Ray's own
object store (Serve's default unless RAY_SERVE_USE_GRPC_BY_DEFAULT / RAY_SERVE_PROXY_USE_GRPC turn the gRPC
path on, which `install()` refuses). So the server is left without a listening port: it starts, and nobody
can connect to it, locally or remotely. `install()` runs when a module defining a deployment is imported,
which in a replica process is before Serve starts that server. pyproject.toml pins the Ray version this
was checked against; another version fails here with the reason rather than running unprotected.
"""

import ray
from ray.serve._private import constants as serve_constants
from ray.serve._private import replica as serve_replica

CHECKED_RAY_VERSION = "2.60.0"


def _no_port(server, address: str) -> None:
    """Stands in for Serve's add_port_to_grpc_server: adds no port (the replica records port None)."""
    return None


def install() -> None:
    """Idempotent. RuntimeError when this Ray could not be checked or would send requests over gRPC."""
    if ray.__version__ != CHECKED_RAY_VERSION:
        raise RuntimeError(
            f"ray {ray.__version__}: Ridgeline closes Serve's inter-deployment gRPC port as "
            f"checked with ray {CHECKED_RAY_VERSION}; install that version"
        )
    if serve_constants.RAY_SERVE_USE_GRPC_BY_DEFAULT or serve_constants.RAY_SERVE_PROXY_USE_GRPC:
        raise RuntimeError(
            "RAY_SERVE_USE_GRPC_BY_DEFAULT / RAY_SERVE_PROXY_USE_GRPC: Ridgeline keeps Serve's "
            "inter-deployment gRPC closed (it unpickles unauthenticated input); unset them"
        )
    if not hasattr(serve_replica, "add_port_to_grpc_server"):
        raise RuntimeError(
            "ray.serve._private.replica.add_port_to_grpc_server is gone: the inter-deployment "
            "gRPC port cannot be closed in this Ray"
        )
    serve_replica.add_port_to_grpc_server = _no_port
