"""Every environment variable Ridgeline reads, in one place."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated artefacts (the default tiny model) live: $RIDGELINE_CACHE_DIR or ~/.cache/ridgeline."""
    root = os.environ.get("RIDGELINE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "ridgeline"


def default_device() -> str | None:
    """$RIDGELINE_DEVICE overrides device selection ("cpu", "cuda", "cuda:1")."""
    return os.environ.get("RIDGELINE_DEVICE") or None


def commit_override() -> str | None:
    """$RIDGELINE_COMMIT names the commit in benchmark results where git cannot (a copy without .git)."""
    return os.environ.get("RIDGELINE_COMMIT") or None
