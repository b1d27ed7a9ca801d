"""The house rules, checked from the source: module size, an acyclic import graph, arrows pointing down
(the runtime path never imports the lab), and what a plain predict loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tta_runtime

PKG = Path(tta_runtime.__file__).parent
MAX_LINES = 500
# The lab and the command line: the runtime path imports none of them, not even inside a function.
LAB = ("tta_runtime.data", "tta_runtime.training", "tta_runtime.evaluation", "tta_runtime.cli")
RUNTIME_PATH = (
    "tta_runtime", "tta_runtime.runtime", "tta_runtime.inputs", "tta_runtime.hub", "tta_runtime.config",
    "tta_runtime.result", "tta_runtime.result_io", "tta_runtime.custom", "tta_runtime.calibration_run",
    "tta_runtime.save", "tta_runtime.schema", "tta_runtime.outputs", "tta_runtime.frozen", "tta_runtime.device", "tta_runtime.errors",
    "tta_runtime.registry", "tta_runtime.metrics", "tta_runtime.visual", "tta_runtime.models", "tta_runtime.adapt",
    "tta_runtime.ood", "tta_runtime.prune", "tta_runtime.deploy", "tta_runtime.video", "tta_runtime.serve",
)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every tta_runtime module `name` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & known
            deps |= subs or ({mod} & known)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names} & known
    deps.discard(name)
    return deps


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_module_over_the_size_limit() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_import_graph_is_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_runtime_path_never_imports_the_lab(graph: dict[str, set[str]]) -> None:
    bad = {
        name: sorted(d for d in deps if _in(d, LAB))
        for name, deps in graph.items()
        if (name in RUNTIME_PATH or _in(name, RUNTIME_PATH[1:])) and not _in(name, LAB)
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"runtime-path modules importing the lab: {bad}"


def test_graph_sees_function_level_imports(graph: dict[str, set[str]]) -> None:
    # the runtime imports the export code inside Runtime.export only: the graph must still see the edge
    assert any(d.startswith("tta_runtime.deploy") for d in graph["tta_runtime.runtime"])


def test_predict_loads_no_lab_module() -> None:
    code = (
        "import sys, numpy as np, tta_runtime as tta\n"
        "rt = tta.Runtime.from_pretrained()\n"
        "rt.predict(np.zeros((40, 40, 3), np.uint8))\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('tta_runtime'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    loaded = out.split()
    assert "tta_runtime.runtime" in loaded
    lab = [m for m in loaded if _in(m, LAB)]
    assert not lab, f"predict loaded lab modules: {lab}"


def test_public_namespace_is_the_documented_api() -> None:
    names = {n for n in dir(tta_runtime) if not n.startswith("__")}
    assert names == set(tta_runtime.__all__)
    assert "runtime" not in names and "config" not in names  # submodules are reachable, not advertised
    assert (PKG / "py.typed").is_file()
