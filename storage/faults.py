"""A place to stop a run on purpose, so tests and drills can kill it *inside* a stage.

``LMFORGE_PAUSE_IN=<stage>`` with ``LMFORGE_PAUSE_MARKER=<path>``: when that stage reaches
its pause point, the process writes ``<path>`` (``<stage> <pid>``) and sleeps, waiting to
be killed (``kill -9``) by whoever watches for the file. The points are where a kill
does the most harm: an artifact writer with every file written but nothing published
(:class:`storage.artifact.ArtifactWriter`), and a training child right after a checkpoint
(:mod:`model.trainer`). A run paused for longer than ``LMFORGE_PAUSE_SECONDS`` (default
600) fails instead of hanging.

With ``LMFORGE_PAUSE_UNTIL=<path>`` the pause ends, and the run goes on, once ``<path>``
exists: a test or a drill does something while the run is stopped there (the deploy
flow's point, ``deploy``, sits between its comparison and its decision: another machine
deciding meanwhile is rehearsed that way).

Without ``LMFORGE_PAUSE_IN`` this costs one environment lookup. It is the kill-anywhere
test's hook (``tests/e2e/test_kill9.py``) and a way to rehearse recovery by hand.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PAUSE_ENV = "LMFORGE_PAUSE_IN"
MARKER_ENV = "LMFORGE_PAUSE_MARKER"
SECONDS_ENV = "LMFORGE_PAUSE_SECONDS"
UNTIL_ENV = "LMFORGE_PAUSE_UNTIL"


def pause_point(stage: str) -> None:
    """Pause here (see the module docstring) when ``LMFORGE_PAUSE_IN`` names ``stage``."""
    if os.environ.get(PAUSE_ENV) != stage:
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        tmp = Path(f"{marker}.{os.getpid()}.tmp")
        tmp.write_text(f"{stage} {os.getpid()}\n")
        os.replace(tmp, marker)  # the watcher never reads a half-written marker
    limit = float(os.environ.get(SECONDS_ENV, "600"))
    until = os.environ.get(UNTIL_ENV)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if until and Path(until).exists():
            return
        time.sleep(min(0.1, limit))
    raise RuntimeError(f"{stage}: paused by {PAUSE_ENV} for {limit:.0f} s and nobody killed the run")


KILL_ENV = "LMFORGE_KILL_AT"
KILL_MARKER_ENV = "LMFORGE_KILL_MARKER"


def kill_point(name: str) -> None:
    """SIGKILL this process once at the point called ``name``, when ``LMFORGE_KILL_AT`` names it.

    The kill happens once per marker: the process first writes ``LMFORGE_KILL_MARKER``
    (required), and a point whose marker exists lets the work go on. That is how a test
    kills a worker process in the middle of one part and watches the stage redo that part
    alone (:mod:`tasks.parts`).
    """
    if os.environ.get(KILL_ENV) != name:
        return
    marker = os.environ.get(KILL_MARKER_ENV)
    if not marker:
        raise RuntimeError(f"{KILL_ENV}={name} needs {KILL_MARKER_ENV}: the kill happens once per marker")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{name} {os.getpid()}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
