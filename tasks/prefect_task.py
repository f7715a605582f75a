"""A stage as a Prefect task: retries, caching by the artifact key, progress in the UI.

The wrapper adds orchestration and nothing else; the stage's ``run`` is the work.

- Cache: :class:`ArtifactKey` asks the stage for its key (:meth:`tasks.stage.Stage.cache_key`,
  the artifact key in this store): the artifact key and Prefect's are one function's
  output. A cache hit whose artifact is gone or damaged is run again by the flow
  (:func:`flows.records.run_stage`), so a deleted artifact is rebuilt, never served.
- Retries: transient failures only (a crashed child, a busy file); a :class:`StageError`,
  a ``ValueError`` or ``TypeError`` (bad input, bad config) fails at once.
- One builder per artifact key: the wrapper holds ``<store>/_locks/<stage>-<key>.lock``
  while the stage runs, so two runs of one key (a doubled schedule, a Retry beside a
  running run) never write the same work directory or checkpoints at once; the second
  waits, then reuses what the first published.
- Records: the task returns a reference to its artifact (``{"stage", "key"}``), stored by
  Prefect as plain JSON that :mod:`tasks.cache_records` checks before Prefect reads it;
  nothing in the store is ever unpickled. The flow loads the manifest from the store.
- Progress: the wrapper passes the stage a ``progress`` callback that moves a Prefect
  progress artifact (:class:`PrefectProgress`); the stage itself never imports Prefect.
- External inputs are read once per task run: the cache key's reads (a folder's listing)
  are handed, by task run id, to the lock key and the stage's ``run``
  (:func:`tasks.stage.inputs_scope`), so Prefect's key, the lock and the artifact name the
  same files. Another attempt of the run reads them again.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from storage.artifact import Manifest
from storage.atomic import exclusive
from tasks.cache_records import RECORD_SERIALIZER, RECORDS_BLOCK, manifest_ref
from tasks.stage import Stage, StageError, inputs_scope, stage_logger


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
class ArtifactKey(CachePolicy):
    """Prefect's cache key = the stage's artifact key in its store (:meth:`tasks.stage.Stage.cache_key`).

    A cache record only says the artifact *was* published; whether it still is, and
    verifies, is checked by the flow on every cache hit (:func:`flows.records.run_stage`),
    which runs the stage again when it is not.
    """

    stage: Stage | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        rest = {k: v for k, v in inputs.items() if k not in ("store", "cfg")}
        with inputs_scope({}) as read:  # a new scope, whatever is open: this attempt's own reads
            key = self.stage.cache_key(inputs["store"], inputs["cfg"], **rest)
        if read:  # only stages with external inputs (ingest) leave anything to hand over
            _reads.put(task_ctx.task_run.id, read)
        return key


class _Reads:
    """The external inputs read for a task run's cache key, until its body takes them.

    The body asks within milliseconds of the key (it takes them before any lock wait). A
    cached run's body never comes, so entries expire after ``ttl`` seconds and at most
    ``keep`` are held: a long-lived worker does not keep every listing it made (one of
    90,000 objects is tens of MB). A run whose reads expired lists again, as before."""

    def __init__(self, keep: int = 8, ttl: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.keep, self.ttl, self.clock = keep, ttl, clock
        self._by_run: OrderedDict[Any, tuple[float, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, run_id, read: dict) -> None:
        with self._lock:
            self._by_run[run_id] = (self.clock(), read)
            self._prune()

    def take(self) -> dict | None:
        """This task run's reads (once), or None outside a task run or when there are none."""
        ctx = TaskRunContext.get()
        if ctx is None:
            return None
        with self._lock:
            self._prune()
            entry = self._by_run.pop(ctx.task_run.id, None)
        return None if entry is None else entry[1]

    def _prune(self) -> None:
        old = self.clock() - self.ttl
        while self._by_run and (len(self._by_run) > self.keep or next(iter(self._by_run.values()))[0] < old):
            self._by_run.popitem(last=False)


_reads = _Reads()


def progress_key(stage: str) -> str:
    """``<stage>-progress`` reduced to the characters Prefect accepts in an artifact key."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-") or "stage"
    return f"{slug}-progress"


class PrefectProgress:
    """A stage's progress bar in the Prefect UI: call it with the fraction done (0..1).

    - Reporting, never the work: every Prefect call is wrapped, and a failure logs one
      warning and disables the bar for the rest of the stage; nothing raises into it.
    - Outside a Prefect run it does nothing.
    - Throttled (at most one update every ``min_seconds``, unless the bar moved by at
      least ``min_step``), so a loop over a million records costs a few API calls.
      :meth:`done` always writes 100%.
    - The key is ``<stage>-progress``, so the Artifacts page keeps one history per stage.
    """

    def __init__(self, stage: str, description: str, *, min_seconds: float = 2.0, min_step: float = 0.01):
        self.stage, self.description = stage, description
        self.key = progress_key(stage)
        self.min_seconds, self.min_step = min_seconds, min_step
        self._id = None
        self._last_fraction = 0.0
        self._last_time = 0.0
        self._finished = False
        try:
            from prefect.context import FlowRunContext, TaskRunContext

            if TaskRunContext.get() is None and FlowRunContext.get() is None:
                return
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(progress=0.0, key=self.key, description=description)
            self._last_time = time.monotonic()
        except Exception as e:  # reporting must never stop the stage
            self._disable(e)

    @property
    def active(self) -> bool:
        """True when updates reach a Prefect progress artifact."""
        return self._id is not None

    def __call__(self, fraction: float) -> None:
        """Report ``fraction`` (0..1, clamped); throttled, so call it as often as is convenient."""
        if self._id is None or self._finished:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        if fraction >= 1.0:
            self.done()
            return
        now = time.monotonic()
        if fraction - self._last_fraction < self.min_step - 1e-9 and now - self._last_time < self.min_seconds:
            return
        if fraction <= self._last_fraction:
            return
        self._write(fraction)
        self._last_time = now

    def done(self) -> None:
        """Mark the stage complete (100%); further updates are ignored."""
        if self._id is None or self._finished:
            return
        self._write(1.0)
        self._finished = True

    def _write(self, fraction: float) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, progress=round(100.0 * fraction, 2))
            self._last_fraction = fraction
        except Exception as e:
            self._disable(e)

    def _disable(self, error: Exception) -> None:
        self._id = None
        stage_logger(self.stage).warning(
            "%s: progress artifact disabled (%s: %s)", self.stage, type(error).__name__, error
        )


def stage_task(
    stage: Stage,
    run: Callable[..., Manifest | None],
    *,
    retries: int = 0,
    retry_delay_seconds: float = 5.0,
    timeout_seconds: float | None = None,
    progress: str | None = None,
):
    """The Prefect task of a stage: cached by its artifact key, retried on transient failures.

    With ``progress`` (the bar's description), ``run`` takes a ``progress`` callback and
    the task passes it a :class:`PrefectProgress`. The task's parameters are ``run``'s,
    less ``progress``: that is what the UI shows and what the cache key reads.
    """
    signature = inspect.signature(run)
    shown = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "progress"])

    def stage_run(*args, **kwargs):
        bound = shown.bind(*args, **kwargs)
        bound.apply_defaults()  # as Prefect's parameters and the stage's own begin() see them
        inputs = dict(bound.arguments)
        store, cfg = inputs.pop("store"), inputs.pop("cfg")
        # The cache key's reads, in a scope of this attempt's own: the same files for key, lock
        # and run. Read before the lock: a run that waits for another builder of its key then
        # finds that builder's artifact (the same files); if that builder failed, this one
        # builds from the files as they were listed before the wait.
        with inputs_scope(_reads.take() or {}):
            key = stage.key(cfg, **inputs)

            def waiting() -> None:
                stage_logger(stage.name).info(
                    "%s: another run is building %s/%s; waiting for it", stage.name, stage.name, key
                )

            # One builder per key at a time: the second run waits, then finds the first one's artifact.
            with exclusive(store.lock_path(stage.name, key), on_wait=waiting):
                if progress is not None:
                    kwargs["progress"] = PrefectProgress(stage.name, progress)
                return manifest_ref(run(*args, **kwargs))

    stage_run.__name__ = stage_run.__qualname__ = f"{stage.name}_run"
    stage_run.__module__ = run.__module__
    stage_run.__doc__ = run.__doc__
    stage_run.__signature__ = shown
    return task(
        stage_run,
        name=stage.name,
        cache_policy=ArtifactKey(stage=stage),
        persist_result=True,
        result_storage=RECORDS_BLOCK,
        result_serializer=RECORD_SERIALIZER,
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=_not_bad_input,
        timeout_seconds=timeout_seconds,
        log_prints=True,
    )
