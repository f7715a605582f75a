"""Training processes die with whoever started them, even when that one is killed by SIGKILL.

``lmforge run`` starts torchrun in its own process group (so a cancel can stop every
worker with one signal); torchrun starts one worker per device. A SIGKILL of the run (an
OOM kill, ``kill -9``, a lost host) runs no cleanup, and without this the training tree
would keep going as orphans: writing checkpoints into the work directory that the rerun
resumes from, and holding the GPUs. Linux's ``PR_SET_PDEATHSIG`` has the kernel send
SIGKILL to a process when its parent dies; the launcher sets it on torchrun, each worker
sets it on itself. Elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; no-op elsewhere).

    ``parent``: the pid expected as parent. If it is already gone (we were re-parented
    before the request took effect), exit at once rather than run on as an orphan.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)
