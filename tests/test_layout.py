"""The architecture's import direction (kernels <- engine <- services -> control_plane; services never
imports benchmarks), and no import cycle among our modules, function-level imports counted."""

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
PRODUCT = ["engine", "kernels", "services", "control_plane", "observability", "benchmarks"]


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


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports anywhere in the file (top level or inside functions)."""
    files = {_module(f): f for package in PRODUCT for f in (ROOT / package).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names |= {
                    f"{node.module}.{alias.name}" for alias in node.names
                }  # submodules imported by name
        graph[module] = {target for n in names if (target := resolve(n)) and target != module}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                cycles.append(sorted([v, *component]))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert cycles == []
