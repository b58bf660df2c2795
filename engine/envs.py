"""Every environment variable Ridgeline reads, in one place."""

import os
from pathlib import Path

REFERENCE_MODELS = Path(__file__).resolve().parents[1] / "models"


def cache_dir() -> Path:
    """Where generated artefacts (the cached tiny model) live: $RIDGELINE_CACHE_DIR or ~/.cache/ridgeline."""
    root = os.environ.get("RIDGELINE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "ridgeline"


def default_model_path() -> Path:
    """The model `ridgeline serve` / `generate` / `LLM()` use when none is named: $RIDGELINE_MODEL, else the
    reference target trained here (models/ridgeline-ref-target, see models/README.md)."""
    path = Path(os.environ.get("RIDGELINE_MODEL") or REFERENCE_MODELS / "ridgeline-ref-target")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model: none named and the default {path} holds no config.json (name one with "
            f"--model or RIDGELINE_MODEL)"
        )
    return path


def default_device() -> str | None:
    """$RIDGELINE_DEVICE overrides device selection ("cpu", "cuda", "cuda:1")."""
    return os.environ.get("RIDGELINE_DEVICE") or None


def commit_override() -> str | None:
    """$RIDGELINE_COMMIT names the commit in benchmark results where git cannot (a copy without .git)."""
    return os.environ.get("RIDGELINE_COMMIT") or None


def api_key() -> str | None:
    """$RIDGELINE_API_KEY: the key `ridgeline serve` requires when --api-key is not given."""
    return os.environ.get("RIDGELINE_API_KEY") or None


def local_cluster_env() -> dict[str, str]:
    """Defaults for a Ray cluster started on this machine by `ridgeline serve`, unless the user set them:
    UCX (NIXL's transport) on loopback, Ray on 127.0.0.1, and Serve's HTTP proxy behind the request body
    and header limits of services/http_limits.py (Serve's documented proxy callback)."""
    wanted = {
        "UCX_NET_DEVICES": "lo",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "services.http_limits:proxy_middlewares",
    }
    return {k: v for k, v in wanted.items() if k not in os.environ}
