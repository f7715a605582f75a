"""The code part of a stage's key: a hash of the source files its module really reaches.

Design decisions:

- The closure is computed from the **source files**, never by importing them: every
  ``import`` / ``from ... import`` statement of a module (top level, inside functions,
  under ``TYPE_CHECKING`` alike) that names a module of this project is followed to its
  file, transitively. Importing only to hash would load torch into the flow process and
  cost seconds; parsing costs milliseconds.
- Project packages are the top-level packages beside this one (``flows``, ``tasks``,
  ``model``, ``storage``); anything else (the standard library, numpy, Prefect) is an
  installed dependency and not hashed here.
- ``from package import name`` reaches ``package/__init__.py`` and, when ``name`` is a
  submodule, ``package/name.py``. A module that runs another as a program (``python -m
  model.train`` in a torchrun child) imports it too, so that the closure sees it.
- :data:`EXCLUDED` lists the modules whose edits must not invalidate artifacts, each with
  its reason: they only report on a run (progress bars, plots) or wrap a stage for
  Prefect (retries, caching). Their imports are not followed either. Nothing is listed
  to be *included*: what a stage reaches is what it imports.
- The hash covers each file's path relative to the project root and its bytes, in sorted
  order, so it is the same on every machine and in every checkout location.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "model", "storage")

EXCLUDED = {
    # Reporting only: a progress bar or a restyled loss curve never changes what a stage computes.
    "tasks.prefect_task",  # the Prefect wrapper: retries, the cache policy, progress artifacts
    "tasks.modeling.loss_plot",  # the loss curve PNG beside a trained model
    "flows.artifacts",  # the Prefect artifacts a flow publishes (tables, markdown)
}


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module (``pkg/mod.py`` or ``pkg/mod/__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def imported_modules(path: Path, name: str) -> frozenset[str]:
    """Names of the project modules that the source file of module ``name`` imports.

    Cached per process, as :func:`code_version` is: the stages of one run share most of
    their closures (storage, tasks.stage, tasks.parts), parsed once instead of once a stage.
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    out = set()
    for module in found:
        # ``import a.b.c`` also runs a/__init__.py and a/b/__init__.py.
        parts = module.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(m for m in out if m.split(".")[0] in PACKAGES)


def closure(name: str, root: Path = ROOT) -> dict[str, Path]:
    """Every project module that module ``name`` reaches through imports (itself included), less EXCLUDED."""
    seen: dict[str, Path] = {}
    todo = [name]
    while todo:
        module = todo.pop()
        if module in seen or module in EXCLUDED:
            continue
        path = module_file(module, root)
        if path is None:
            continue
        seen[module] = path
        todo.extend(imported_modules(path, module) - seen.keys())
    return seen


@lru_cache(maxsize=None)
def code_version(name: str, root: Path = ROOT) -> str:
    """Hash of the source files module ``name`` reaches: editing any of them changes it.

    Cached per process: a stage's code does not change under a running flow.
    """
    files = closure(name, root)
    if name not in files:
        raise ValueError(f"{name!r} is not a module of this project under {root}")
    h = hashlib.sha256()
    for path in sorted(files.values()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
