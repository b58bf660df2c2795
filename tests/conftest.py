import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **overrides) -> path of a checkpoint built once per session."""
    from engine.tiny_model import make_tiny_model

    made: dict[tuple, str] = {}

    def get(arch: str = "llama", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = str(make_tiny_model(out, arch, **overrides))
        return made[key]

    return get


@pytest.fixture(scope="session")
def llama(tiny_model):
    return tiny_model("llama")
