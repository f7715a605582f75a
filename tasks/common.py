"""What every stage shares: config base, errors, content keys, and the Prefect wrapper.

A stage is ``run(store, cfg, **inputs) -> Manifest``: a plain function over artifacts,
callable and testable without Prefect. It starts with :func:`begin`, which derives the
artifact key from its inputs' manifests, its config and its code, and returns the
published manifest at once when that key already exists (so a stage is idempotent even
without Prefect's cache). :func:`stage_task` wraps it as a Prefect task whose cache key
is the same content hash (:class:`ManifestCachePolicy`): never a Path's name, never a
big object. A stage that reads local files outside the store defines a module-level
``cache_fingerprint(**inputs) -> str`` (e.g. names, sizes and mtimes of its inputs) and
passes the same value to :func:`begin` as an input, so both keys see changed files.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel, ConfigDict

from storage.artifact import Manifest, Store, artifact_key


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are an error, values are immutable.

    Defaults go through the validators too: a validator that normalizes (sorts a list of
    languages, say) must give the same value whether it came from the default or from a
    form or YAML file that spells the default out, or the same settings would hash to two
    artifact keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class StageError(RuntimeError):
    """Bad input or an impossible request: names the stage, the input and the reason.

    Not retried: retrying cannot fix the input. ``hint`` tells the user what to do next.
    """

    def __init__(self, stage: str, input: str, reason: str, hint: str | None = None):
        self.stage, self.input, self.reason, self.hint = stage, input, reason, hint
        msg = f"[{stage}] {input}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):
        # Prefect pickles a failed task's exception into its state; rebuild it from its parts.
        return type(self), (self.stage, self.input, self.reason, self.hint)


def stage_logger(stage: str) -> logging.Logger:
    """Loggers under ``lmforge.`` reach the Prefect run log (PREFECT_LOGGING_EXTRA_LOGGERS).

    Prefect attaches its API handler to them but leaves their level at the root's
    WARNING, which would drop every progress line: the package logger is set to INFO.
    """
    root = logging.getLogger("lmforge")
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return logging.getLogger(f"lmforge.{stage}")


def code_version(*module_names: str) -> str:
    """Hash of the source of the given modules: editing a stage invalidates its cache."""
    h = hashlib.sha256()
    for name in module_names:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Manifest):
        return {"manifest": value.digest()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Store):
        return {"store": str(value.root)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def stage_key(stage: str, code: str, cfg: BaseModel, inputs: dict[str, Any]) -> str:
    """The artifact key of a stage: its parent manifests, config (+ config-like inputs) and code."""
    parents = [inputs[k] for k in sorted(inputs) if isinstance(inputs[k], Manifest)]
    extra = {k: _jsonable(v) for k, v in sorted(inputs.items()) if not isinstance(v, Manifest)}
    config = {"cfg": cfg.model_dump(mode="json"), **extra}
    return artifact_key(stage, parents, config, code)


@dataclass
class Begun:
    """What :func:`begin` found: the key to write under, and the artifact if already there."""

    key: str
    done: Manifest | None
    parents: list[Manifest]
    config: dict[str, Any]


FAIL_STAGE_ENV = "LMFORGE_FAIL_STAGE"
FAIL_STAGE_FILE_ENV = "LMFORGE_FAIL_STAGE_FILE"


def _injected_failure(stage: str) -> str | None:
    """Which switch asks ``stage`` to fail, if any.

    ``LMFORGE_FAIL_STAGE=<stage>`` fails it in every run of this process. A worker's
    environment is fixed when it starts, so for runs started from the UI the switch is
    a file instead: ``LMFORGE_FAIL_STAGE_FILE=<path>`` fails the stage named in that file
    while the file exists; delete it and press Retry.
    """
    if os.environ.get(FAIL_STAGE_ENV) == stage:
        return FAIL_STAGE_ENV
    path = os.environ.get(FAIL_STAGE_FILE_ENV)
    if path:
        try:
            with open(path) as f:
                if f.read().strip() == stage:
                    return path
        except OSError:
            pass
    return None


def begin(store: Store, stage: str, code: str, cfg: BaseModel, **inputs: Any) -> Begun:
    """Compute the key; return the published artifact if it exists (verifying its files).

    A failure switch (:func:`_injected_failure`) makes the stage fail here, before it
    writes anything: fault injection for testing rerun-from-cache, and for rehearsing
    recovery.
    """
    switch = _injected_failure(stage)
    if switch:
        raise StageError(stage, switch, "failure injected on purpose", f"clear {switch} to run normally")
    key = stage_key(stage, code, cfg, inputs)
    parents = [inputs[k] for k in sorted(inputs) if isinstance(inputs[k], Manifest)]
    for p in parents:
        if store.load(p.stage, p.key) is None:
            raise StageError(stage, p.ref, "input artifact is missing from the store", "rerun the pipeline to rebuild it")
    config = {"cfg": cfg.model_dump(mode="json")}
    config.update({k: _jsonable(v) for k, v in inputs.items() if not isinstance(v, Manifest)})
    done = store.load(stage, key)
    if done is not None:
        store.verify(done)
        stage_logger(stage).info("%s: artifact %s already published, reusing it", stage, key)
    return Begun(key, done, parents, config)


# --- Prefect -----------------------------------------------------------------------------

def _not_bad_input(task, task_run, state) -> bool:
    """Retry transient failures only: bad input and bad config fail at once."""
    try:
        state.result()
    except (StageError, ValueError, TypeError):
        return False
    except Exception:
        return True
    return True


@dataclass
class ManifestCachePolicy(CachePolicy):
    """Cache key = store root + the task's code + its inputs by content (manifest digests)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        fn = task_ctx.task.fn
        module = inspect.getmodule(fn)
        payload = {
            "task": f"{fn.__module__}.{fn.__qualname__}",
            "code": getattr(module, "CODE_VERSION", None) or code_version(fn.__module__),
            "inputs": {k: _jsonable(v) for k, v in sorted(inputs.items())},
        }
        # Stages that read outside the store (local files) fold their content in here.
        fingerprint = getattr(module, "cache_fingerprint", None)
        if fingerprint is not None:
            payload["fingerprint"] = fingerprint(**inputs)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_task(fn: Callable[..., Manifest], *, name: str, retries: int = 0, retry_delay_seconds: float = 5.0, timeout_seconds: float | None = None):
    """The Prefect task of a stage: content-hash caching, retries on transient failures."""
    return task(
        fn,
        name=name,
        cache_policy=ManifestCachePolicy(),
        persist_result=True,
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=_not_bad_input,
        timeout_seconds=timeout_seconds,
        log_prints=True,
    )
