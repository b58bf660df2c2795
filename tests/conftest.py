import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is; on CPU they are deselected (reported), never silently passed."""
    if ON_GPU:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


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
