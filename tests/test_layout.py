"""The architecture's import direction: kernels <- engine <- services -> control_plane."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"engine", "kernels", "services", "control_plane", "observability", "benchmarks"}
FORBIDDEN = {
    "kernels": OURS - {"kernels"},
    "engine": {"ray", "fastapi", "starlette", "uvicorn", "services", "control_plane", "benchmarks"},
    "control_plane": {"torch", "triton", "engine", "kernels", "services", "benchmarks"},
    "observability": {"engine", "kernels", "services", "control_plane", "benchmarks"},
    "services": {"benchmarks"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_kernels_resolves_to_this_repository():
    """The PyPI package named `kernels` must never shadow ours."""
    import kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
