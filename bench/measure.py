"""What the benchmarks measure about a process tree (memory, cores busy): shared by the bench scripts.

:class:`TreeMeter` samples a process and all its descendants (plus any other processes
named by ``also``, e.g. a Ray cluster's daemons and workers) while a block runs: the
peak of their summed memory and the CPU time they used, hence how many cores were busy.
:func:`measured_child` runs a benchmark's child process under a TreeMeter.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Callable

import psutil


class TreeMeter:
    """Peak memory and CPU time of a process tree while the ``with`` block runs.

    Memory: each process counts its proportional set size (PSS: pages shared by n processes
    count 1/n in each), so forked workers sharing their parent's pages are not counted
    twice; ``peak`` is the largest sum seen. CPU: user + system time of every process seen,
    counted from the block's start (a process born during the block from zero), plus the
    time of ended processes that no sample saw: the kernel adds a child's time (its own
    ended children's included) to its parent's ``children_*`` when the parent waits for it,
    so what a sampled process's ``children_*`` grew by over the block, less the last-seen
    totals of its sampled children that ended, is the time of children no sample caught (and
    the last moments of those it did). Those are augment's Apertium pipelines: a shell and
    five programs per batch, each living a fraction of a second; without them the stage
    read 0.3 cores busy. A process that ends unwaited (a fork server's parent does not wait
    for it) loses what it used since its last sample, so ``cpu_seconds`` is a slight
    underestimate. ``machine_cpu_seconds`` is every process's CPU time over the block: on a
    quiet machine the two agree (the scale benchmark's stages on 2 workers: within 1%, augment
    8% under). Samples come every 50 ms or 10x as long as a sample takes (reading PSS of
    twenty Ray processes is not free): the sampler stays under a tenth of a core.
    """

    def __init__(self, pid: int | None = None, also: Callable[[], list[psutil.Process]] | None = None):
        self.proc = psutil.Process(pid)
        self.also = also
        self.peak = 0
        self.cpu_seconds = 0.0
        self.machine_cpu_seconds = 0.0  # every process's, over the block: the check of cpu_seconds on a quiet machine
        self.seconds = 0.0
        # per process (pid, start time): CPU seconds of its own, and of its waited-for ended children
        self._own_start: dict[tuple[int, float], float] = {}
        self._own: dict[tuple[int, float], float] = {}
        self._reaped_start: dict[tuple[int, float], float] = {}
        self._reaped: dict[tuple[int, float], float] = {}
        self._parent: dict[tuple[int, float], int] = {}
        self._ended: dict[int, float] = {}  # by parent pid: last-seen totals of its sampled children that ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            procs = []
        procs += self.also() if self.also else []
        return list({p.pid: p for p in procs}.values())

    def _sample(self, first: bool = False) -> None:
        total, seen = 0, {}
        for p in self._procs():
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    parent = p.ppid()
            except psutil.Error:
                continue
            # An ended child not yet waited for (a zombie) is seen too: counted here, not again
            # when its parent waits for it (a fork server may do so during the next block).
            seen[key] = (t.user + t.system, t.children_user + t.children_system, parent)
            try:
                total += p.memory_full_info().pss
            except psutil.Error:  # a zombie has no memory to read
                pass
        # Sampled processes that ended since the last sample, by parent: their totals as last seen,
        # with those of their own sampled children that ended meanwhile (reaped by them since).
        gone = [k for k in self._reaped.keys() - seen.keys() if k in self._parent]
        children: dict[int, list[tuple[int, float]]] = {}
        for key in gone:
            children.setdefault(self._parent[key], []).append(key)

        def last_total(key: tuple[int, float]) -> float:
            return self._own[key] + self._reaped[key] + sum(last_total(c) for c in children.get(key[0], []))

        for key in gone:
            self._ended[self._parent[key]] = self._ended.get(self._parent[key], 0.0) + last_total(key)
        for key in gone:
            del self._parent[key]  # counted once
        for key, (own, reaped, parent) in seen.items():
            if first:
                self._own_start[key], self._reaped_start[key] = own, reaped
            self._own[key], self._reaped[key], self._parent[key] = own, reaped, parent
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._sample()
            self._stop.wait(max(0.05, 10 * (time.perf_counter() - started)))

    def __enter__(self) -> "TreeMeter":
        self._machine0 = _machine_cpu()
        self._t0 = time.perf_counter()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._t0
        self.machine_cpu_seconds = _machine_cpu() - self._machine0
        # What each process's children_* grew by, less its sampled children's part: summed over the
        # whole block, so a child waited for between the sampling of it and of its parent (its time
        # in both) is still counted once.
        unseen = sum(
            max(0.0, reaped - self._reaped_start.get(k, 0.0) - self._ended.get(k[0], 0.0))
            for k, reaped in self._reaped.items()
        )
        self.cpu_seconds = unseen + sum(own - self._own_start.get(k, 0.0) for k, own in self._own.items())

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second over the block."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def peak_mib(self) -> int:
        return round(self.peak / 2**20)


def _machine_cpu() -> float:
    """CPU seconds the whole machine has used (all processes, all cores) since it booted."""
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def measured_child(cmd: list[str], what: str, also: Callable[[], list[psutil.Process]] | None = None) -> dict:
    """Run ``cmd``, a child that prints its result as JSON on its last line, under a
    :class:`TreeMeter`; its result plus the tree's ``process_seconds``, ``cores_busy`` and
    ``peak_mib``. A failed child ends the benchmark, naming ``what`` (its log is above)."""
    with TreeMeter(also=also) as meter:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed; its log is above")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {
        "process_seconds": round(meter.seconds, 2),
        "cores_busy": round(meter.cores_busy, 2),
        "peak_mib": meter.peak_mib,
    }
