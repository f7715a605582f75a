"""Publishing a directory atomically: build it under a temporary name, fsync, rename.

The one way lmforge makes a directory appear whole or not at all: artifacts
(:class:`storage.artifact.ArtifactWriter`), training checkpoints and the trained model
(``model/``). Standard library only, so ``model/`` can use it without pulling in
pyarrow or anything else of ``storage``.

Design decisions:
- A temporary directory is a sibling of its final path (same file system, so the rename
  is atomic) named ``.tmp-<final name>-<host>-<pid>-<random>``. Only directories whose
  writer process is gone (same host, pid not alive) are swept by later writers; a writer
  still at work, or one on another host sharing the file system, keeps its directory.
- Files and the directory are fsynced before the rename, and the parent after it, so a
  power cut leaves the old state or the new one. Replacing an existing directory takes two
  renames (old aside, new in): a crash between them leaves the new one under its
  temporary name and no final path, which readers treat as absent (a checkpoint: the run
  resumes from the one before; a model directory: training is rerun).
- Two runs that would build the same path take turns: :func:`exclusive` locks a file
  beside it for as long as one of them works.
- When the final path exists, ``replace`` decides: a checkpoint or a model directory is
  replaced (old one renamed aside, new one in, old one removed); a content-addressed
  artifact is kept (same key, same content) and the new copy discarded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"
_HOST = socket.gethostname().replace("-", "_")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def abandoned(tmp_name: str) -> bool:
    """Whether a temporary directory belongs to a writer on this host that has exited."""
    parts = tmp_name.rsplit("-", 3)  # ['.tmp-<name>', host, pid, id]
    if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 8:
        return True  # not a name this module makes: left by an older layout
    host, pid = parts[1], parts[2]
    if host != _HOST:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def new_temp_dir(final: Path) -> Path:
    """A fresh, empty temporary directory beside ``final``; abandoned ones of ``final`` are swept first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        if abandoned(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path, *, replace: bool) -> bool:
    """fsync ``tmp`` and everything in it, then rename it to ``final``.

    Returns False when ``final`` already existed and ``replace`` is False: ``tmp`` is then
    removed and ``final`` left as it was.
    """
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(tmp)
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another writer published the same path between our check and our rename.
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            return publish_dir(tmp, final, replace=True)
    fsync_dir(final.parent)
    return True


@contextmanager
def _locked(path: Path, wait: bool, on_wait=None) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def exclusive(path: Path, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``flock``: released by the kernel when the holder exits, even by SIGKILL, so a killed
    run never leaves a stale lock; it works across hosts on NFSv4. ``on_wait()`` is
    called once when another process holds the lock and this one starts waiting.
    """
    with _locked(path, wait=True, on_wait=on_wait):
        yield


@contextmanager
def exclusive_if_free(path: Path) -> Iterator[bool]:
    """True, holding the lock for the block, when nobody holds ``path``; False (not waiting) otherwise."""
    with _locked(path, wait=False) as held:
        yield held
