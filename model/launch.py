"""Start training as a torchrun child process and stream its output.

Design decisions:
- A child process, not ``elastic_launch`` in-process: the caller (a Prefect task) keeps
  its own process clean of process groups and CUDA contexts, can be cancelled without
  leaking workers, and the exact same command line works by hand and on a cluster.
- ``python -m torch.distributed.run`` (torchrun) with ``--standalone`` (one node, a free
  rendezvous port). Across hosts, each host runs the same command with a
  :class:`Rendezvous` instead: torchrun's c10d rendezvous at one ``host:port`` that every
  node reaches, ``--nnodes`` of them, one shared job id. torchrun assigns the ranks; the
  training code is the same (``-m model.train --spec``), and so are its results: two
  nodes of one process give one process's losses (tested, gloo, both nodes on one machine).
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of one multi-node job meet: torchrun's c10d rendezvous.

    ``endpoint`` is ``host:port`` of the first node (any node that all reach; torchrun
    serves the rendezvous there), ``nnodes`` how many nodes join, ``job_id`` one name
    that all nodes share and no other job uses at that endpoint at the same time.
    """

    endpoint: str
    nnodes: int
    job_id: str

    def __post_init__(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"rendezvous endpoint must be host:port, got {self.endpoint!r}")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not self.job_id or not all(c.isalnum() or c in "-_." for c in self.job_id):
            raise ValueError(f"job id must be letters, digits, '-', '_' or '.', got {self.job_id!r}")

    def torchrun_args(self) -> list[str]:
        return [
            *("--nnodes", str(self.nnodes), "--rdzv-backend", "c10d"),
            *("--rdzv-endpoint", self.endpoint, "--rdzv-id", self.job_id),
        ]


def torchrun_command(spec_path: str | Path, nproc: int, rendezvous: Rendezvous | None = None) -> list[str]:
    """The command of one node: ``--standalone`` alone, or this node's part of ``rendezvous``."""
    where = rendezvous.torchrun_args() if rendezvous else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
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
    rendezvous: Rendezvous | None = None,
) -> None:
    """Run training under torchrun with ``nproc`` workers (on this node of ``rendezvous``, if given).

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
    cmd = torchrun_command(spec_path, nproc, rendezvous)
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
