"""What the benchmarks measure about the machine and a process tree: shared by the bench scripts.

:func:`machine` describes where a figure was measured (it goes into every results file).
:class:`TreeMeter` samples a process and all its descendants (plus any other processes
named by ``also``, e.g. a Ray cluster's daemons and workers) while a block runs: the
peak of their summed memory and the CPU time they used, hence how many cores were busy.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable

import psutil


def machine() -> dict:
    """Python, CPU model, cores and memory of this machine."""
    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


class TreeMeter:
    """Peak memory and CPU time of a process tree while the ``with`` block runs.

    Memory: each process counts its proportional set size (PSS: pages shared by n processes
    count 1/n in each), so forked workers sharing their parent's pages are not counted
    twice; ``peak`` is the largest sum seen. CPU: user + system time of every process seen,
    counted from the block's start (a process born during the block from zero); a process
    that ends between two samples loses what it used since the last one, so ``cpu_seconds``
    is a slight underestimate. Samples come every 50 ms or 10x as long as a sample takes
    (reading PSS of twenty Ray processes is not free): the sampler stays under a tenth of a core.
    """

    def __init__(self, pid: int | None = None, also: Callable[[], list[psutil.Process]] | None = None):
        self.proc = psutil.Process(pid)
        self.also = also
        self.peak = 0
        self.cpu_seconds = 0.0
        self.seconds = 0.0
        self._start: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
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
        total = 0
        for p in self._procs():
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    total += p.memory_full_info().pss
            except psutil.Error:
                continue
            used = t.user + t.system
            if first:
                self._start[key] = used
            self._last[key] = used
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._sample()
            self._stop.wait(max(0.05, 10 * (time.perf_counter() - started)))

    def __enter__(self) -> "TreeMeter":
        self._t0 = time.perf_counter()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = sum(used - self._start.get(key, 0.0) for key, used in self._last.items())

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second over the block."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def peak_mib(self) -> int:
        return round(self.peak / 2**20)
