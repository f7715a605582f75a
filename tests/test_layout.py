"""The layering a newcomer relies on: engines stand alone, tasks/ holds stages, no import cycles."""

import subprocess
import sys

import pytest

from tasks.code_version import PACKAGES, ROOT, imported_modules, module_file
from tests.stages import STAGES

ENGINES = sorted(p.stem for p in (ROOT / "tasks" / "text").glob("*.py") if p.stem != "__init__")
SHARED = ["__init__", "stage", "code_version", "prefect_task"]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_imports_no_prefect_no_torch_no_store(engine):
    code = (
        f"import sys, tasks.text.{engine}; bad = [m for m in ('prefect', 'torch', 'storage', 'model', 'flows') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_tasks_top_level_is_the_stages_and_what_they_share():
    modules = sorted(p.stem for p in (ROOT / "tasks").glob("*.py"))
    assert modules == sorted(STAGES + SHARED)


def _module_level_imports(name: str) -> set[str]:
    """Project modules imported at module level (not inside functions): what runs at import time."""
    import ast

    path = module_file(name)
    tree = ast.parse(path.read_bytes())
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1]) + (f".{node.module}" if node.module else "")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m) is not None}


def test_no_import_cycles():
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    graph = {m: _module_level_imports(m) - {m} for m in modules}
    assert all(imported_modules(module_file(m), m) is not None for m in modules)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
