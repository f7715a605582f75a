"""The Ray engine of :mod:`tasks.parts`: a stage's per-part steps as Ray tasks on a cluster.

``execution: {engine: ray, address: ...}`` in a profile sends the data stages' parts to a
Ray cluster instead of local processes. Everything else is the local engine's: the same
step functions, the same checkpoint per finished part under the store's ``_work``, the
same retry of a part whose worker died, the same errors, so the artifact is the same
file for file whichever engine ran it (tested).

Design decisions:

- Ray core, not a scheduler of our own: one Ray task per part (``num_cpus=1``, placed
  by Ray's default scheduler on a node with a free CPU), at most ``workers`` in flight
  (0: as many as the cluster has CPUs). Ray's own task retries are off
  (``max_retries=0``) so that a dead worker comes back here as ``WorkerCrashedError``,
  ``NodeDiedError`` or ``OutOfMemoryError``; this engine then logs the part by name and
  resubmits it alone, as the local engine does, and records it in
  ``meta.execution.retried_parts``.
- Per-part Ray tasks, not per-part Prefect tasks: a Common Crawl ingest has tens of
  thousands of parts per stage, and a Prefect task run per part would put that many rows
  in the Prefect database and the UI per stage. The stage stays one Prefect task (cached,
  retried, its progress bar counting parts); Ray does the fan-out under it.
- A node that mounts the driver's file system reads and writes the store's paths as they
  are. One that does not, with ``store: s3://...``, gets its inputs from the bucket and
  puts its finished parts there (:mod:`tasks.parts.exchange`). Workers need lmforge
  importable (installed on every node, as ``ray start`` runs it); the driver's
  ``LMFORGE_*`` variables travel with every task, except ``LMFORGE_STORE_CACHE``: where
  a node keeps its copy of a bucket is the node's own business.
- The connection is made once per process and reused by the next stage; ``address`` ''
  starts a one-machine Ray in this process (handy to try the engine), ``auto`` joins the
  cluster this machine is a node of, ``host:6379`` or ``ray://host:10001`` a remote one.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
from ray import exceptions as ray_errors

from tasks.parts.core import Part, run_part, share_cores, switches, take_switches
from tasks.parts.exchange import DriverExchange
from tasks.stage import StageError

NODE_OWN = ("LMFORGE_STORE_CACHE",)  # where a node keeps its copy of a bucket is its own business
WORKER_DEATHS = (ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, ray_errors.OutOfMemoryError)
_connected: str | None = None  # the address this process joined


def connect(address: str, stage: str) -> None:
    """Join the Ray cluster at ``address`` (once per process; a different address reconnects)."""
    global _connected
    if ray.is_initialized() and _connected == address:
        return
    if ray.is_initialized():
        ray.shutdown()
    try:
        _reachable(address)
        ray.init(
            address=address or "local",  # "": a new Ray inside this run, never a cluster found by chance
            logging_level=logging.WARNING,
            configure_logging=False,
            include_dashboard=False if not address else None,
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise StageError(
            stage,
            f"execution.address {address!r}",
            f"cannot join the Ray cluster: {e}",
            "start it with `ray start --head` (and `ray start --address HEAD:6379` on the other hosts), or set execution.engine: local",
        ) from e
    _connected = address


def _reachable(address: str, seconds: float = 5.0) -> None:
    """Fail fast on a cluster that is not there: Ray itself retries an unreachable address for minutes."""
    if address in ("", "auto"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not 'host:port' or 'ray://host:port'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e})") from None


def shutdown() -> None:
    """Leave the cluster (tests; a process that ends leaves it anyway)."""
    global _connected
    if ray.is_initialized():
        ray.shutdown()
    _connected = None


def _run_part_on_node(
    given: dict[str, str], stage: str, step: str, fn: Callable, part: Part, step_dir: str, args, wire
) -> tuple[Any, str, bool]:
    """The Ray task: one part, on whichever node Ray chose; returns the result, that node's id,
    and whether its part folder went through the bucket (``wire``: a :class:`BucketExchange`, or None)."""
    take_switches(given, keep=NODE_OWN)
    share_cores(1)  # the task holds num_cpus=1
    node = ray.get_runtime_context().get_node_id()
    if wire is None or wire.shared():
        return run_part(stage, step, fn, part, step_dir, args), node, False
    part = replace(part, path=wire.localize(part.path))
    args = tuple(wire.localize(a) if isinstance(a, str) else a for a in args)
    here = wire.local(step_dir)
    result = run_part(stage, step, fn, part, here, args)
    wire.send(Path(here) / f"{part.index:05d}")
    return result, node, True


class RayCluster:
    """Runs parts as Ray tasks; the engine interface of :class:`tasks.parts.partmap.PartMap`."""

    name = "ray"

    def __init__(self, stage: str, address: str, workers: int, exchange: DriverExchange | None = None) -> None:
        connect(address, stage)
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.nodes: set[str] = set()  # the nodes that ran a part
        self.exchange = exchange  # how nodes without the driver's file system reach it (an s3:// store)
        self.through_bucket = 0  # parts whose folder came back through the bucket
        self._task = ray.remote(num_cpus=1, max_retries=0)(_run_part_on_node)
        self._running: dict[Any, tuple[Part, int]] = {}

    def close(self, kill: bool = False) -> None:
        for ref in self._running:
            ray.cancel(ref, force=True)
        self._running = {}
        if self.exchange is not None:
            self.exchange.close()

    def run(self, pm, step: str, fn: Callable, todo: list[Part], step_dir: Path, args: tuple, report, part_args):
        queue = list(reversed(todo))  # pop() takes them in the map's order (biggest first)
        tries = {p.index: 0 for p in todo}
        wire = self.exchange.wire if self.exchange is not None else None
        if self.exchange is not None:
            self.exchange.ship([a for a in args if isinstance(a, str)])
        fn_ref, args_ref = ray.put(fn), ray.put(args)  # shipped once, not once per part
        env = {k: v for k, v in switches().items() if k not in NODE_OWN}
        while queue or self._running:
            while queue and len(self._running) < self.workers:
                p = queue.pop()
                tries[p.index] += 1
                extra = part_args(p)
                if self.exchange is not None:
                    self.exchange.ship([p.path, *(a for a in extra if isinstance(a, str))])
                given = ray.put((*extra, *args)) if extra else args_ref
                ref = self._task.remote(env, pm.stage, step, fn_ref, p, str(step_dir), given, wire)
                self._running[ref] = (p, tries[p.index])
            (ref,), _ = ray.wait(list(self._running), num_returns=1)
            p, tried = self._running.pop(ref)
            try:
                result, node, via_bucket = ray.get(ref)
            except WORKER_DEATHS as e:
                pm.worker_died(step, p, tried, f"Ray: {type(e).__name__}")
                queue.append(p)
                continue
            except ray_errors.RayTaskError as e:
                raise pm.part_failed(step, p, e.cause if e.cause is not None else e, str(e)) from None
            if via_bucket:
                self.exchange.receive(Path(step_dir) / f"{p.index:05d}")
                self.through_bucket += 1
            self.nodes.add(node)
            report(p, result)
