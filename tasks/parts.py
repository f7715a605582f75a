"""Parts: the unit of parallel work of a data stage, mapped over every core.

An artifact's Parquet parts (``part-00000.parquet`` ...) are what a stage maps over. A
step of a stage is a function ``fn(part, out_dir, *args) -> result`` that reads one input
part and writes its outputs into ``out_dir``; :class:`PartMap` runs it once per part, on
worker processes, and returns the results in part order.

Design decisions:

- Every finished part is a checkpoint in the store: its outputs and its pickled result
  are published atomically as ``<work dir>/<step>/<index>/`` (:mod:`storage.atomic`), and
  a part found there is not run again. A run killed midway (the whole flow, or one
  worker) redoes only the parts that did not finish; the stage's artifact is still
  published in one step at the end, from the finished parts.
- Workers are long-lived processes forked from a clean fork server (no inherited
  Prefect threads or locks, no re-import of the parent's main module), each with a
  pipe, one part at a time: when a worker dies (SIGKILL, out of memory) the parent
  knows which part it held, logs it, starts a new worker and retries that part alone,
  up to ``attempts`` times; then the stage fails naming the part and its input file.
  An exception inside ``fn`` is not retried: it is bad input, raised as the stage's
  error with the part named.
- With one worker, or one part to do, the parts run in this process: the same
  checkpoints, no process start-up.
- The ordinal of a document (``Part.start`` + its row in the part) is its position in
  the artifact, whatever ran it: "first in artifact order" means the same thing with 1
  worker or 64, so results do not depend on the worker count.
- Nothing here knows Prefect: the stage passes a progress callback (parts done / total),
  and the log says how many parts of each step are done, about ten times a step.
- This is the local engine. On a Ray cluster the same per-part functions are what Ray
  would run (each is a plain function of a part and a directory); that engine is not
  written yet.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow.parquet as pq
from pydantic import Field

from storage.artifact import ArtifactWriter, Manifest
from storage.atomic import new_temp_dir, publish_dir
from storage.faults import kill_point
from tasks.stage import Progress, StageConfig, StageError, no_progress

RESULT = "result.pkl"


class Execution(StageConfig):
    """How wide the data stages' per-part steps run. Never part of an artifact's key: the
    results are the same whatever is set here."""

    workers: int = Field(
        0, ge=0, le=1024, description="Worker processes for the per-part steps; 0: every core of this machine."
    )
    memory_mb: int = Field(
        1024,
        ge=64,
        le=1 << 20,
        description="Memory ceiling (MiB) of a stage's global step (dedup's grouping in DuckDB); past it, it spills to disk under the store.",
    )

    def worker_count(self) -> int:
        return self.workers or default_workers()


@dataclass(frozen=True)
class Part:
    """One input part: where it is, and which documents of the artifact it holds."""

    index: int
    name: str  # the input file, as the manifest lists it
    path: str
    start: int  # ordinal of its first row in the artifact
    rows: int


def input_parts(manifest: Manifest, prefix: str = "part") -> list[Part]:
    """The artifact's ``<prefix>-*.parquet`` files as parts, in artifact order, with their row ranges."""
    parts, start = [], 0
    for i, f in enumerate(e for e in manifest.files_with_prefix(prefix + "-") if e.path.endswith(".parquet")):
        path = str(manifest.path(f.path))
        rows = f.rows if f.rows is not None else pq.ParquetFile(path).metadata.num_rows
        parts.append(Part(i, f.path, path, start, rows))
        start += rows
    return parts


def add_part_files(w: ArtifactWriter, parts: Sequence[Part], dirs: Sequence[Path], names: dict[str, str]) -> None:
    """Put each part's finished files into the artifact: ``dirs[i]/<file>`` becomes
    ``<names[file]>-<part index>.parquet`` (a file a part did not write is skipped), so
    output part N comes from input part N whatever the number of workers."""
    for part, d in zip(parts, dirs):
        for filename, prefix in names.items():
            src = d / filename
            if src.exists():
                w.add_file(src, f"{prefix}-{part.index:05d}.parquet", pq.ParquetFile(src).metadata.num_rows)


def default_workers() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_part(stage: str, step: str, fn: Callable, part: Part, step_dir: str, args: tuple) -> Any:
    """Run ``fn`` on one part and publish its outputs and result as ``<step_dir>/<index>``; returns the result."""
    final = Path(step_dir) / f"{part.index:05d}"
    tmp = new_temp_dir(final)
    try:
        result = fn(part, tmp, *args)
        (tmp / RESULT).write_bytes(pickle.dumps(result))
        kill_point(f"{stage}/{step}/{part.index}")  # every output written, the part not published
        if not publish_dir(tmp, final, replace=False):  # another run finished it first: same content
            return pickle.loads((final / RESULT).read_bytes())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


SWITCHES = "LMFORGE_"
"""Environment variables a worker takes from its parent at every job (the fault switches of
:mod:`storage.faults` among them): a worker's own environment is fixed when it starts."""


def _switches() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(SWITCHES)}


def _serve(conn: Connection) -> None:
    """A worker: run parts sent over ``conn`` until told to stop (a None job)."""
    while True:
        job = conn.recv()
        if job is None:
            return
        switches, job = job
        for k in [k for k in os.environ if k.startswith(SWITCHES) and k not in switches]:
            del os.environ[k]
        os.environ.update(switches)
        try:
            conn.send(("ok", run_part(*job)))
        except Exception as e:  # sent back to the parent, which raises it naming the part
            try:
                conn.send(("error", e, traceback.format_exc()))
            except Exception:  # the exception does not pickle: its text does
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))


def _context():
    """Workers fork from a fork server that has imported this module and nothing else.

    Not ``fork``: the parent may be a Prefect flow run with threads and locks held. Not
    ``spawn``: it imports the parent's main module in every worker (under the ``lmforge``
    command, the CLI and Prefect: seconds and hundreds of MiB each).
    """
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class _Worker:
    def __init__(self) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="lmforge-part-worker")
        self.proc.start()
        child.close()

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class PartMap:
    """Runs a stage's per-part steps on ``workers`` processes, with checkpoints under ``work_dir``.

    Usage::

        with PartMap("dedup", store.work_dir("dedup", key), workers=4, log=log) as pm:
            results = pm.map("sign", sign_part, parts, params)
            outputs = pm.outputs("sign", parts)   # the directory of each finished part
    """

    def __init__(
        self,
        stage: str,
        work_dir: Path,
        *,
        workers: int,
        log: logging.Logger,
        progress: Progress = no_progress,
        attempts: int = 3,
    ):
        self.stage, self.work_dir, self.workers = stage, Path(work_dir), max(1, workers)
        self.log, self.progress, self.attempts = log, progress, attempts
        self.retried: list[str] = []  # "<step> <input file>" of every part retried after its worker died
        self._pool: list[_Worker] = []

    def __enter__(self) -> "PartMap":
        return self

    def __exit__(self, *exc) -> None:
        for w in self._pool:
            w.stop(kill=exc[0] is not None)
        self._pool = []

    def step_dir(self, step: str) -> Path:
        d = self.work_dir / step
        d.mkdir(parents=True, exist_ok=True)
        return d

    def outputs(self, step: str, parts: Sequence[Part]) -> list[Path]:
        """Where each part's outputs of ``step`` are (after :meth:`map`)."""
        return [self.step_dir(step) / f"{p.index:05d}" for p in parts]

    def map(
        self, step: str, fn: Callable, parts: Sequence[Part], *args: Any, progress: Progress | None = None
    ) -> list[Any]:
        """``fn(part, out_dir, *args)`` for every part not already finished; every part's result, in order.

        ``progress`` (default: the map's own) hears the fraction of this step's parts done.
        """
        progress = progress or self.progress
        step_dir = self.step_dir(step)
        results: dict[int, Any] = {}
        for p in parts:
            done = step_dir / f"{p.index:05d}" / RESULT
            if done.exists():
                results[p.index] = pickle.loads(done.read_bytes())
        todo = [p for p in parts if p.index not in results]
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

        if self.workers == 1 or len(todo) <= 1:
            for p in todo:
                report(p, self._in_process(step, fn, p, step_dir, args))
        else:
            self._on_workers(step, fn, todo, step_dir, args, report)
        return [results[p.index] for p in parts]

    def _in_process(self, step: str, fn: Callable, part: Part, step_dir: Path, args: tuple) -> Any:
        try:
            return run_part(self.stage, step, fn, part, str(step_dir), args)
        except StageError:
            raise
        except Exception as e:
            raise self._failed(step, part, f"{type(e).__name__}: {e}") from e

    def _failed(self, step: str, part: Part, reason: str) -> StageError:
        return StageError(self.stage, f"{part.name} ({part.path})", f"{step} failed: {reason}")

    def _replace(self, w: _Worker) -> _Worker:
        self._pool.remove(w)
        w.stop(kill=True)
        fresh = _Worker()
        self._pool.append(fresh)
        return fresh

    def _on_workers(self, step, fn, todo: list[Part], step_dir: Path, args: tuple, report) -> None:
        queue = deque(todo)
        tries = {p.index: 0 for p in todo}
        busy: dict[Connection, tuple[_Worker, Part]] = {}
        while len(self._pool) < min(self.workers, len(todo)):
            self._pool.append(_Worker())
        idle = list(self._pool)
        while queue or busy:
            while idle and queue:
                w, p = idle.pop(), queue.popleft()
                try:
                    w.conn.send((_switches(), (self.stage, step, fn, p, str(step_dir), args)))
                except OSError:  # the worker died while idle: a new one, and the part goes back
                    idle.append(self._replace(w))
                    queue.appendleft(p)
                    continue
                tries[p.index] += 1
                busy[w.conn] = (w, p)
            for conn in wait(list(busy)):
                w, p = busy.pop(conn)
                try:
                    status, *payload = conn.recv()
                except (EOFError, OSError):
                    w.proc.join(5)
                    code = w.proc.exitcode
                    self.retried.append(f"{step} {p.name}")
                    if tries[p.index] >= self.attempts:
                        raise StageError(
                            self.stage,
                            f"{p.name} ({p.path})",
                            f"{step}: its worker process died {tries[p.index]} times (last exit code {code})",
                            "look for the kernel's out-of-memory killer, or lower the part size",
                        ) from None
                    self.log.warning(
                        "%s: %s: the worker on %s died (exit code %s); retrying that part alone (attempt %d of %d)",
                        self.stage,
                        step,
                        p.name,
                        code,
                        tries[p.index] + 1,
                        self.attempts,
                    )
                    queue.appendleft(p)
                    idle.append(self._replace(w))
                    continue
                if status == "error":
                    error, trace = payload
                    self.log.debug("%s: %s on %s failed in its worker:\n%s", self.stage, step, p.name, trace)
                    if isinstance(error, StageError):
                        raise error
                    raise self._failed(step, p, f"{type(error).__name__}: {error}")
                idle.append(w)
                report(p, payload[0])
