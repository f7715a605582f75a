"""What every stage shares: its identity, its key, its errors, and the checks on its input.

A stage is ``run(store, cfg, **inputs) -> Manifest``: a plain function over artifacts,
callable and testable without Prefect (:mod:`tasks.prefect_task` wraps it as a task).
Each stage module declares one :class:`Stage` and starts ``run`` with
:meth:`Stage.begin`, which derives the artifact key and returns the published artifact
at once when that key already exists, so a stage is idempotent even without Prefect.

The key (:meth:`Stage.key`) is one content hash of the arguments of ``run`` as they were
passed, defaults included (Prefect's cache policy binds them the same way):
- the parents: the digests of the input manifests;
- the config and the other inputs (a split, a flag), as JSON;
- the code: :func:`tasks.code_version.code_version` of the stage module, the source files
  of everything it imports in this project;
- the external inputs, declared once per stage (``Stage.external``): a fingerprint of what
  the stage reads outside the store (local files, installed translation models).

Prefect's cache key is derived from the same key (:meth:`Stage.cache_key`), so the two
cannot disagree.

External inputs are read once per run (:func:`inputs_scope`, :func:`read_once`): a
folder's or a bucket prefix's listing serves the key, the builder's lock and the parts
alike, so all three name the same files and a prefix of 90,000 objects is listed once,
not three times. A stage's ``run`` that reads such inputs opens the scope (ingest's); the
Prefect wrapper opens it earlier, at the cache key, and hands it to the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from pydantic import BaseModel

from storage.artifact import ArtifactError, Manifest, Store, artifact_key, columns_of
from tasks.code_version import code_version
from tasks.text.settings import Settings

StageConfig = Settings
"""Base of every stage config (:class:`tasks.text.settings.Settings`: strict, frozen, finite)."""

Progress = Callable[[float], None]
"""Reports the fraction (0..1) of a stage's work done; the Prefect wrapper passes one in."""


def no_progress(_fraction: float) -> None:
    """The progress callback of a stage called outside Prefect: reports nowhere."""


T = TypeVar("T")
_read: ContextVar[dict[str, Any] | None] = ContextVar("stage_inputs_read", default=None)


@contextmanager
def inputs_scope(memo: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Within this block, :func:`read_once` reads each external input once.

    Without ``memo`` (a stage's ``run``): joins the scope already open, if any, so a run
    called by the Prefect wrapper reuses the wrapper's reads; else opens one. With ``memo``
    (the wrapper; ``{}`` for none yet): a new scope over it, whatever is open, holding what
    an earlier scope of the same attempt read (its cache key's).
    """
    outer = _read.get()
    if memo is None and outer is not None:
        yield outer
        return
    token = _read.set({} if memo is None else memo)
    try:
        yield _read.get()
    finally:
        _read.reset(token)


def read_once(name: str, read: Callable[[], T]) -> T:
    """``read()``, once per :func:`inputs_scope` for each ``name``; outside a scope, every time.

    ``name`` says what is read, all of it (kind and location): two reads of one name in a
    scope must mean the same thing.
    """
    memo = _read.get()
    if memo is None:
        return read()
    if name not in memo:
        memo[name] = read()
    return memo[name]


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Manifest):
        return {"manifest": value.digest()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# Arguments of ``run`` that are not inputs of the computation: where it writes, how it reports,
# how many processes it uses (results do not depend on it, so neither does the key).
NOT_INPUTS = ("store", "progress", "execution")


@dataclass
class Begun:
    """What :meth:`Stage.begin` found: the key to write under, and the artifact if already there."""

    key: str
    done: Manifest | None
    parents: list[Manifest]
    config: dict[str, Any]
    code_version: str


FAIL_STAGE_ENV = "LMFORGE_FAIL_STAGE"
FAIL_STAGE_FILE_ENV = "LMFORGE_FAIL_STAGE_FILE"


def injected_failure(stage: str) -> str | None:
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


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name, the module whose code it is, its external inputs.

    ``external(cfg, **inputs) -> str`` fingerprints what the stage reads from outside the
    store (names, sizes and mtimes of local files; the identity of installed models); it
    is part of the key, so a changed file outside the store is a new artifact.
    """

    name: str
    module: str
    external: Callable[..., str] | None = None

    @property
    def code_version(self) -> str:
        return code_version(self.module)

    def _parts(self, cfg: BaseModel, inputs: dict[str, Any]) -> tuple[list[Manifest], dict[str, Any]]:
        inputs = {k: v for k, v in inputs.items() if k not in NOT_INPUTS}
        parents = [inputs[k] for k in sorted(inputs) if isinstance(inputs[k], Manifest)]
        config = {"cfg": cfg.model_dump(mode="json")}
        config.update({k: _jsonable(v) for k, v in sorted(inputs.items()) if not isinstance(v, Manifest)})
        if self.external is not None:
            config["external"] = self.external(cfg, **inputs)
        return parents, config

    def key(self, cfg: BaseModel, **inputs: Any) -> str:
        """The artifact key of this stage for ``cfg`` and ``inputs`` (see the module docstring)."""
        parents, config = self._parts(cfg, inputs)
        return artifact_key(self.name, parents, config, self.code_version)

    def cache_key(self, store: Store, cfg: BaseModel, **inputs: Any) -> str:
        """Prefect's cache key: the artifact key, in this store (records may be shared by stores)."""
        where = hashlib.sha256(store.url.encode()).hexdigest()[:12]
        return f"{self.name}-{self.key(cfg, **inputs)}-{where}"

    def begin(self, store: Store, cfg: BaseModel, **inputs: Any) -> Begun:
        """Compute the key; return the published artifact if it exists and verifies.

        Every input artifact is verified first (sizes and checksums of its files, once per
        process): a tampered or truncated input is a StageError naming it. A published
        artifact of this key that does not verify is moved aside and built again.

        A failure switch (:func:`injected_failure`) makes the stage fail here, before it
        writes anything: fault injection for testing rerun-from-cache, and for rehearsing
        recovery.
        """
        switch = injected_failure(self.name)
        if switch:
            raise StageError(self.name, switch, "failure injected on purpose", f"clear {switch} to run normally")
        parents, config = self._parts(cfg, inputs)
        also_read = [m for v in inputs.values() if isinstance(v, (list, tuple)) for m in v if isinstance(m, Manifest)]
        for p in [*parents, *also_read]:
            published = store.load(p.stage, p.key)
            if published is None:
                raise StageError(
                    self.name, p.ref, "input artifact is missing from the store", "rerun the pipeline to rebuild it"
                )
            try:
                store.verify(published)
            except ArtifactError as e:
                raise StageError(
                    self.name,
                    p.ref,
                    f"input artifact does not verify: {e}",
                    "rerun the pipeline: it rebuilds a damaged artifact",
                ) from None
        key = artifact_key(self.name, parents, config, self.code_version)
        done = store.load(self.name, key)
        if done is not None:
            try:
                store.verify(done)
                stage_logger(self.name).info("%s: artifact %s already published, reusing it", self.name, key)
            except ArtifactError as e:
                aside = store.quarantine(done)
                stage_logger(self.name).warning("%s: %s; moved it to %s and building it again", self.name, e, aside)
                done = None
        return Begun(key, done, parents, config, self.code_version)

    def writer(self, store: Store, begun: Begun, extra_parents: list[Manifest] = ()):
        """The artifact writer for a begun run: its key, parents, config and code version recorded."""
        return store.writer(
            self.name,
            begun.key,
            parents=[*begun.parents, *extra_parents],
            config=begun.config,
            code_version=begun.code_version,
        )


def require_columns(
    stage: str,
    docs: Manifest,
    needed: list[str],
    *,
    absent: tuple[str, ...] = (),
    upstream: str = "the previous text stage",
    empty_hint: str | None = None,
    allow_empty: bool = False,
) -> set[str]:
    """The columns of a text artifact, checked: it has documents (unless ``allow_empty``),
    the ``needed`` columns, and none of ``absent`` (columns this stage adds: it was fed
    its own output). A StageError names what is wrong and what to feed instead.
    """
    parts = [f for f in docs.files_with_prefix("part-") if f.path.endswith(".parquet")]
    if not allow_empty and not sum(f.rows or 0 for f in parts):
        raise StageError(
            stage,
            docs.ref,
            "the input artifact has no documents (no part-*.parquet rows)",
            empty_hint or f"check the counters of {upstream}: did it keep anything?",
        )
    have = columns_of(docs)
    missing = [c for c in needed if c not in have]
    if parts and missing:
        raise StageError(
            stage, docs.ref, f"documents lack column(s) {missing}", f"{stage} reads the output of {upstream}"
        )
    ours = sorted(set(absent) & have)
    if ours:
        raise StageError(
            stage, docs.ref, f"documents already have {ours}", f"feed {stage} the output of {upstream}, not its own"
        )
    return have
