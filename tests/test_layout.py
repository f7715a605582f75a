"""The layering a newcomer relies on: engines stand alone, tasks/ holds stages, no import cycles."""

import subprocess
import sys

import pytest

from tasks.code_version import PACKAGES, ROOT, imported_modules, module_file
from tests.stages import OPTIONAL_STAGES, STAGES

ENGINES = sorted(p.stem for p in (ROOT / "tasks" / "text").glob("*.py") if p.stem != "__init__")
SHARED = ["__init__", "stage", "code_version", "prefect_task", "cache_records", "inputs"]


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
    assert modules == sorted(STAGES + OPTIONAL_STAGES + SHARED)


def test_no_import_cycles():
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    # Every import counts, those inside functions and under TYPE_CHECKING too: a cycle there is still two
    # modules that cannot be understood one without the other.
    graph = {m: {n for n in imported_modules(module_file(m), m) if n in modules} - {m} for m in modules}
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


@pytest.mark.parametrize("stage", STAGES + OPTIONAL_STAGES)
def test_a_stage_keys_every_argument_of_run(stage):
    """begin() gets every argument of run() (as passed), so Prefect's cache key, which binds run's
    parameters with their defaults, and the artifact key are the same hash of the same inputs.
    The exceptions are NOT_INPUTS: where it writes, how it reports, how many workers it uses."""
    import ast
    import importlib
    import inspect

    from tasks.stage import NOT_INPUTS

    module = importlib.import_module(f"tasks.{stage}")
    params = set(inspect.signature(module.run).parameters) - {"cfg", *NOT_INPUTS}
    tree = ast.parse((ROOT / "tasks" / f"{stage}.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "begin"]
    assert {k.arg for k in call.keywords} == params
    assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in call.keywords)  # passed as they came
