"""Start training as a torchrun child process and stream its output.

Design decisions:
- A child process, not ``elastic_launch`` in-process: the caller (a Prefect task) keeps
  its own process clean of process groups and CUDA contexts, can be cancelled without
  leaking workers, and the exact same command line works by hand and on a cluster.
- ``python -m torch.distributed.run`` (torchrun) with ``--standalone`` (one node, a free
  rendezvous port). Multi-node jobs run the same ``-m model.train --spec`` under torchrun's
  c10d rendezvous directly.
- Every line of the child's stdout and stderr goes to ``on_line`` as it arrives, so the
  task's log shows training progress live; the last lines ride on the RuntimeError of a
  failed run, so the cause (a traceback from rank N) is in the task's failure message.
- The child's environment carries no credentials (:func:`child_environment`).
- The spec is validated here, before any process starts: a bad config is a ValueError
  in the caller (never retried), not a failed child and a retry.
- On CPU each worker gets ``OMP_NUM_THREADS=1``: two workers with two threads each on a
  two-core machine ran at a quarter of the speed of one thread each (measured on a
  2-core machine).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from model import train as entrypoint
from model.lifetime import die_with_parent

_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the model package


_CREDENTIAL_WORDS = ("KEY", "SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "AUTH", "DATABASE_CONNECTION_URL")


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` less anything that looks like a credential (a name containing KEY, SECRET,
    PASSWORD, TOKEN, CREDENTIAL or AUTH, or a database URL): training talks to no API and no
    database, so it gets none of their secrets."""
    return {k: v for k, v in env.items() if not any(w in k.upper() for w in _CREDENTIAL_WORDS)}


def default_nproc() -> int:
    """One process per visible GPU, else one CPU process (a config may ask for 2 gloo workers)."""
    return torch.cuda.device_count() or 1


def torchrun_command(spec_path: str | Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        entrypoint.__name__,
        "--spec",
        str(spec_path),
    ]


def launch(
    spec_path: str | Path,
    nproc: int,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    tail_lines: int = 40,
) -> None:
    """Run training under torchrun with ``nproc`` workers.

    ValueError for a spec that does not validate (before anything starts); RuntimeError,
    with the child's last lines, when training fails.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    entrypoint.TrainSpec.load(spec_path)
    child_env = child_environment({**os.environ, **(env or {})})
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), child_env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        child_env.setdefault("OMP_NUM_THREADS", "1")
    cmd = torchrun_command(spec_path, nproc)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    launcher = os.getpid()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group, so cancelling us stops every worker
        preexec_fn=lambda: die_with_parent(launcher),  # and a SIGKILL of us stops it too (model/lifetime.py)
    )
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if rc != 0:
        last = "\n".join(tail)
        raise RuntimeError(f"training failed (exit code {rc}): {' '.join(cmd)}\n--- last output ---\n{last}")
