"""The local engine of per-part work: long-lived worker processes on this machine.

Workers fork from a fork server that has imported this module and the Parquet stack
(:data:`PRELOAD`), each with a pipe and one part at a time, so when one dies the parent knows which part it held.
They do not run the parent's main module (:func:`_without_main`).
"""

from __future__ import annotations

import functools
import pickle
import traceback
from collections import deque
from multiprocessing import get_context, spawn
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable

from tasks.parts.core import LOCAL_ENV, Part, default_workers, run_part, share_cores, switches, take_switches


def _serve(conn: Connection, threads: int) -> None:
    """A worker: run parts sent over ``conn`` until told to stop (a None job); its libraries'
    thread pools take ``threads`` threads (:func:`tasks.parts.core.share_cores`)."""
    share_cores(threads)
    while True:
        job = conn.recv()
        if job is None:
            return
        given, job = job
        take_switches(given, LOCAL_ENV)
        try:
            conn.send(("ok", run_part(*job)))
        except Exception as e:  # sent back to the parent, which raises it naming the part
            try:
                pickle.loads(pickle.dumps(e))  # one that pickles but cannot be rebuilt would break the parent
                conn.send(("error", e, traceback.format_exc()))
            except Exception:  # the exception does not travel: its text does
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))


PRELOAD = ("numpy", "pyarrow", "pyarrow.parquet", "pandas")
"""What the fork server imports beside this module, once per run: every stage's parts read or
write Parquet, and pyarrow imports pandas (when installed) the first time it converts Python
rows. Imported in each new worker instead, it cost the first part of every map about 0.3 s
per worker (measured on the 2-core build machine: 0.28-0.36 s, 0.01-0.04 s preloaded); a stage
makes new workers for each of its maps. A module missing here is skipped, not an error."""


WORKER_NAME = "lmforge-part-worker"


def _without_main(get_preparation_data: Callable[[str], dict]) -> Callable[[str], dict]:
    """``multiprocessing.spawn.get_preparation_data``, less the parent's main module for our workers.

    A process that multiprocessing starts through a fork server (or spawns) first runs the
    parent's main module again, as ``__mp_main__``, so that functions defined there unpickle.
    Under a Prefect deployment the parent is ``python -m prefect.engine`` or ``prefect
    flow-run execute``: every worker of every map imported Prefect anew (0.9 s and 58 MiB
    each on the 2-core build machine, some ten maps a data refresh). A worker runs
    steps that live in modules, never in a main script, so it skips that; other processes
    (any other name) are left as the standard library makes them.
    """

    @functools.wraps(get_preparation_data)
    def preparation(name: str) -> dict:
        data = get_preparation_data(name)
        if name == WORKER_NAME:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation.lmforge_without_main = True
    return preparation


def _context():
    """Workers fork from a fork server that has imported this module and :data:`PRELOAD`.

    Not ``fork``: the parent may be a Prefect flow run with threads and locks held. Not
    ``spawn``: a fresh interpreter imports numpy and pyarrow again in every worker. Either
    way, the workers do not run the parent's main module (:func:`_without_main`).
    """
    if not getattr(spawn.get_preparation_data, "lmforge_without_main", False):
        spawn.get_preparation_data = _without_main(spawn.get_preparation_data)
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__, *PRELOAD])
    return ctx


def start_fork_server() -> None:
    """Start the workers' fork server now and return at once: its imports (:data:`PRELOAD`,
    about 0.4 s on the 2-core build machine) then overlap what the caller does before its
    first map (listing and hashing the inputs), instead of holding the first workers back.
    Does nothing when it runs already (it lives as long as this process)."""
    from multiprocessing import forkserver

    _context()  # sets what it preloads
    forkserver.ensure_running()


class _Worker:
    def __init__(self, threads: int) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, threads), daemon=True, name=WORKER_NAME)
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


class LocalProcesses:
    """The local engine: ``workers`` long-lived processes, one part at a time each.

    ``run`` reports each finished part through ``report`` and leaves the verdicts on a dead
    worker or a failed part to ``pm`` (the :class:`~tasks.parts.partmap.PartMap` asking).
    """

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.threads = max(1, default_workers() // self.workers)  # each worker's share of the cores
        self._pool: list[_Worker] = []

    def close(self, kill: bool = False) -> None:
        for w in self._pool:
            w.stop(kill=kill)
        self._pool = []

    def _replace(self, w: _Worker) -> _Worker:
        self._pool.remove(w)
        w.stop(kill=True)
        fresh = _Worker(self.threads)
        self._pool.append(fresh)
        return fresh

    def run(self, pm, step: str, fn: Callable, todo: list[Part], step_dir: Path, args: tuple, report, part_args):
        queue = deque(todo)
        tries = {p.index: 0 for p in todo}
        busy: dict[Connection, tuple[_Worker, Part]] = {}
        while len(self._pool) < min(self.workers, len(todo)):
            self._pool.append(_Worker(self.threads))
        idle = list(self._pool)
        while queue or busy:
            while idle and queue:
                w, p = idle.pop(), queue.popleft()
                try:
                    given = (*part_args(p), *args)
                    w.conn.send((switches(LOCAL_ENV), (pm.stage, step, fn, p, str(step_dir), given)))
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
                    pm.worker_died(step, p, tries[p.index], f"exit code {w.proc.exitcode}")
                    queue.appendleft(p)
                    idle.append(self._replace(w))
                    continue
                if status == "error":
                    error, trace = payload
                    raise pm.part_failed(step, p, error, trace)
                idle.append(w)
                report(p, payload[0])
