"""Parts between the flow's machine and Ray nodes that share no file system, through the store's bucket.

With ``store: s3://...`` every machine keeps its own copy of the store
(:mod:`storage.object_store`). A Ray node that does not mount the driver's file system
cannot open the paths a stage hands its steps: an input part, the folder a step writes
into, a file the driver made for the step (dedup's decisions, ingest's removals). This
module carries them through the bucket instead.

Design decisions:

- A node uses the driver's paths as they are (a shared file system: no bucket traffic)
  when its own copy of the store is at the driver's path and it sees there the marker file
  that the driver wrote into the stage's work folder under a name of its own. Otherwise
  (another path, set by the node's ``LMFORGE_STORE_CACHE``, or the same path on a disk of
  its own) it goes through the bucket as below. The path alone would not do: every host
  may keep its copy at ``~/.cache/lmforge/stores/...`` without sharing it.
- Paths are mapped by their place in the store: the driver's ``<copy>/<rel>`` is the
  bucket's ``<rel>``. A published artifact's files are in the bucket already (publishing
  uploads them); a node puts its copies of them under the stage's work folder
  (``_work/<stage>/<key>/fetched/<rel>``), never into its own artifact folders, which
  hold only what its store published or fetched whole. A work file is at the same
  ``_work/...`` place on every machine.
- The driver uploads the work files it made before the step that reads them
  (:meth:`DriverExchange.ship`); a node uploads each part folder it finished
  (:meth:`BucketExchange.send`) and the driver downloads it
  (:meth:`DriverExchange.receive`) before reading it or handing it to a later step.
- Every download lands under a temporary name and is renamed into place: a node killed
  mid-download leaves nothing half-written that a later part would read.
- The bucket's copy of the work folder is deleted when the stage's part map closes,
  whether it succeeded or not: the driver keeps every finished part locally, so a rerun
  ships again what its nodes need.
- Paths outside the store are left alone: a WARC file on a local path must be on every
  node at that path; one in a bucket is downloaded by the worker that reads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage.artifact import Store
from storage.atomic import new_temp_dir, publish_dir
from storage.object_store import ObjectStore

log = logging.getLogger("lmforge.parts")
WORK = "_work"


@dataclass(frozen=True)
class BucketExchange:
    """What a node needs to reach the driver's files (picklable: it travels with every Ray task)."""

    url: str  # the store's bucket
    driver_root: str  # the driver's copy of the store
    work_rel: str  # the stage's work folder, relative to the store
    marker: str  # a file only the driver's file system has

    def shared(self) -> bool:
        """Whether this machine uses the driver's files (then nothing goes through the bucket):
        its copy of the store is at the driver's path, and that path holds the driver's marker."""
        return str(Store(self.url).root) == self.driver_root and os.path.exists(self.marker)

    def rel(self, path: str | os.PathLike[str]) -> str | None:
        """``path``'s place in the store (posix), or None for a path outside it."""
        try:
            return PurePosixPath(os.path.normpath(path)).relative_to(self.driver_root).as_posix()
        except ValueError:
            return None

    def local(self, path: str) -> str:
        """Where ``path`` (a driver's path) is on this node: a work file at its place, an
        artifact file under the stage's ``fetched`` folder, anything else unchanged."""
        rel = self.rel(path)
        if rel is None:
            return path
        root = Store(self.url).root
        return str(root / rel if rel.startswith(WORK + "/") else root / self.work_rel / "fetched" / rel)

    def localize(self, path: str) -> str:
        """:meth:`local`, downloaded from the bucket first if this node has no copy (a file, or
        every object under a folder)."""
        rel, local = self.rel(path), Path(self.local(path))
        if rel is None or local.exists():
            return str(local)
        bucket = ObjectStore(self.url)
        if bucket.exists(rel):
            _download(bucket, rel, local)
        else:
            for name in bucket.list_tree(rel):
                if not (local / name).exists():
                    _download(bucket, f"{rel}/{name}", local / name)
        return str(local)

    def send(self, folder: Path) -> None:
        """Upload a finished part folder of this node to its place in the bucket."""
        rel, bucket = Path(folder).relative_to(Store(self.url).root).as_posix(), ObjectStore(self.url)
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            bucket.put(path, f"{rel}/{path.relative_to(folder).as_posix()}")


class DriverExchange:
    """The driver's side: ships its work files, receives the nodes' part folders, cleans up."""

    def __init__(self, store: Store, work_dir: Path):
        work_dir.mkdir(parents=True, exist_ok=True)
        marker = work_dir / f".driver-{uuid.uuid4().hex}"
        marker.write_text("a node that sees this file shares the driver's file system\n")
        self.bucket = ObjectStore(store.remote.url)
        work_rel = work_dir.relative_to(store.root).as_posix()
        self.wire = BucketExchange(store.remote.url, str(store.root), work_rel, str(marker))
        self._in_bucket: set[str] = set()  # work files known to be there (shipped, or sent by a node)

    def ship(self, paths: list[str]) -> None:
        """Upload the work files among ``paths`` (files, or folders of them) that the bucket lacks."""
        for path in paths:
            rel = self.wire.rel(path)
            if rel is None or not rel.startswith(WORK + "/") or not os.path.exists(path):
                continue
            files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files:
                key = self.wire.rel(f)
                if key not in self._in_bucket and not Path(key).name.startswith(".driver-"):
                    self.bucket.put(f, key)
                    self._in_bucket.add(key)

    def receive(self, folder: Path) -> None:
        """Download a part folder a node finished, unless this machine has it."""
        rel = self.wire.rel(folder)
        names = self.bucket.list_tree(rel)
        self._in_bucket.update(f"{rel}/{n}" for n in names)
        if folder.exists():
            return
        tmp = new_temp_dir(folder)
        try:
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                self.bucket.get(f"{rel}/{name}", tmp / name)
            publish_dir(tmp, folder, replace=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        """Delete the bucket's copy of the work folder and the marker."""
        try:
            self.bucket.delete_tree(self.wire.work_rel)
        except OSError as e:  # leftovers cost space, not results: say so and go on
            log.warning("parts: could not delete %s/%s from the bucket: %s", self.bucket.url, self.wire.work_rel, e)
        Path(self.wire.marker).unlink(missing_ok=True)


def _download(bucket: ObjectStore, rel: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex}")
    try:
        bucket.get(rel, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
