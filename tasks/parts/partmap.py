"""PartMap: a stage's per-part steps on an engine, with a checkpoint per finished part."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from storage.artifact import Store
from tasks.parts.core import RESULT, Execution, Part, read_result, run_part
from tasks.parts.local import LocalProcesses, start_fork_server
from tasks.stage import Progress, StageError, no_progress


class PartMap:
    """Runs a stage's per-part steps on an engine, with checkpoints under ``work_dir``.

    ``store``: the stage's store; with an ``s3://`` store and the Ray engine, nodes that do
    not share the driver's file system get their files through the bucket
    (:mod:`tasks.parts.exchange`).

    Usage::

        with PartMap("dedup", store.work_dir("dedup", key), execution=cfg.execution, log=log, store=store) as pm:
            results = pm.map("sign", sign_part, parts, params)
            outputs = pm.outputs("sign", parts)   # the directory of each finished part
    """

    def __init__(
        self,
        stage: str,
        work_dir: Path,
        *,
        execution: Execution,
        log: logging.Logger,
        progress: Progress = no_progress,
        attempts: int = 3,
        store: Store | None = None,
    ):
        self.stage, self.work_dir = stage, Path(work_dir)
        self.log, self.progress, self.attempts = log, progress, attempts
        self.retried: list[str] = []  # "<step> <input file>" of every part retried after its worker died
        if execution.engine == "ray":
            try:
                from tasks.parts.exchange import DriverExchange
                from tasks.parts.ray_cluster import RayCluster  # Ray is an extra: imported only when asked for
            except ImportError as e:
                raise StageError(
                    stage, "execution.engine 'ray'", f"Ray is not installed ({e})", "pip install 'lmforge[ray]'"
                ) from e
            # Nodes that do not mount the driver's file system reach an s3:// store's files through its bucket.
            exchange = DriverExchange(store, self.work_dir) if store is not None and store.remote is not None else None
            self.engine = RayCluster(stage, execution.address, execution.workers, exchange)
        else:
            self.engine = LocalProcesses(execution.worker_count())
        self.workers = self.engine.workers

    def __enter__(self) -> "PartMap":
        return self

    def __exit__(self, *exc) -> None:
        self.engine.close(kill=exc[0] is not None)

    def describe(self) -> dict:
        """What ran the parts, for the artifact's ``meta.execution``."""
        return {"engine": self.engine.name, "workers": self.workers, "retried_parts": self.retried} | (
            {"nodes": len(self.engine.nodes), "parts_through_bucket": self.engine.through_bucket}
            if hasattr(self.engine, "nodes")
            else {}
        )

    def step_dir(self, step: str) -> Path:
        d = self.work_dir / step
        d.mkdir(parents=True, exist_ok=True)
        return d

    def outputs(self, step: str, parts: Sequence[Part]) -> list[Path]:
        """Where each part's outputs of ``step`` are (after :meth:`map`)."""
        return [self.step_dir(step) / f"{p.index:05d}" for p in parts]

    def map(
        self,
        step: str,
        fn: Callable,
        parts: Sequence[Part],
        *args: Any,
        progress: Progress | None = None,
        isolate: bool = False,
        part_args: Callable[[Part], tuple] | None = None,
    ) -> list[Any]:
        """``fn(part, out_dir, *args)`` for every part not already finished; every part's result, in order.

        ``part_args``: arguments of each part's own, ``fn(part, out_dir, *part_args(part), *args)``
        (the paths of that part's files: a node without the driver's file system then fetches
        those, not every part's).
        ``progress`` (default: the map's own) hears the fraction of this step's parts done.
        ``isolate``: always in a worker process, never in this one, even for one part or one
        worker (a step that may end its own process, as extract's watchdog does).
        """
        progress = progress or self.progress
        own_args = part_args or _no_args
        step_dir = self.step_dir(step)
        results: dict[int, Any] = {}
        for p in parts:
            done = step_dir / f"{p.index:05d}" / RESULT
            if done.exists():
                results[p.index] = read_result(done.parent)
        # Biggest input first (longest-processing-time order): the last parts to start are
        # small ones, so a map's workers finish close together. Results keep artifact order.
        todo = sorted((p for p in parts if p.index not in results), key=_biggest_first)
        if results:
            self.log.info(
                "%s: %s: %d of %d parts already done, reusing them", self.stage, step, len(results), len(parts)
            )
        total, finished = len(parts), len(results)

        every = max(1, total // 10)  # about ten log lines a step, whatever the number of parts

        def report(part: Part, result: Any) -> None:
            nonlocal finished
            results[part.index] = result
            finished += 1
            progress(finished / max(total, 1))
            if finished % every == 0 or finished == total:
                self.log.info("%s: %s: %d of %d parts done", self.stage, step, finished, total)

        if self.engine.name == "local" and not isolate and (self.workers == 1 or len(todo) <= 1):
            for p in todo:
                report(p, self._in_process(step, fn, p, step_dir, (*own_args(p), *args)))
        elif todo:
            self.engine.run(self, step, fn, todo, step_dir, args, report, own_args)
        return [results[p.index] for p in parts]

    def _in_process(self, step: str, fn: Callable, part: Part, step_dir: Path, args: tuple) -> Any:
        try:
            return run_part(self.stage, step, fn, part, str(step_dir), args)
        except StageError:
            raise
        except Exception as e:
            raise self.part_failed(step, part, e) from e

    def part_failed(self, step: str, part: Part, error: BaseException, trace: str = "") -> StageError:
        """The stage's error for an exception raised by ``fn`` on ``part`` (bad input: not retried)."""
        if trace:
            self.log.debug("%s: %s on %s failed in its worker:\n%s", self.stage, step, part.name, trace)
        if isinstance(error, StageError):
            return error
        return StageError(self.stage, f"{part.name} ({part.path})", f"{step} failed: {type(error).__name__}: {error}")

    def worker_died(self, step: str, part: Part, tries: int, how: str) -> None:
        """The worker running ``part`` died (``how``: its exit code, or the engine's word): log the
        retry, or raise once the part has had ``attempts`` tries. The engine then retries it alone."""
        self.retried.append(f"{step} {part.name}")
        if tries >= self.attempts:
            raise StageError(
                self.stage,
                f"{part.name} ({part.path})",
                f"{step}: its worker process died {tries} times (last: {how})",
                "look for the kernel's out-of-memory killer, or lower the part size",
            )
        self.log.warning(
            "%s: %s: the worker on %s died (%s); retrying that part alone (attempt %d of %d)",
            self.stage,
            step,
            part.name,
            how,
            tries + 1,
            self.attempts,
        )


def _biggest_first(part) -> int:
    """Sort key: a part's input bytes, negated. Units without a size (0, or none at all, as dedup's
    slices) come after those with one, in their own order (the sort is stable)."""
    return -getattr(part, "bytes", 0)


def _no_args(part: Part) -> tuple:
    """The ``part_args`` of a step whose parts take the same arguments."""
    return ()


def warm_up(execution: Execution) -> None:
    """Start the engine's slow start-up now, in the background, for a stage that is about to
    plan its parts: with local workers, the fork server (:func:`tasks.parts.local.start_fork_server`).
    Ray starts when a :class:`PartMap` asks for it; one worker runs in this process."""
    if execution.engine == "local" and execution.worker_count() > 1:
        start_fork_server()
