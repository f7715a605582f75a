"""``lmforge gc``: remove from a store what no artifact and no running job needs.

What goes, and why it is safe:
- ``<stage>/.tmp-*``: temporary directories of writers that are gone (a crash, a kill).
  A writer still at work on this host, or any writer of another host, keeps its own
  (:mod:`storage.atomic` decides, as the writers themselves do).
- ``_work/<stage>/<key>``: scratch space (training checkpoints, finetune subsets) of a key
  whose artifact is published: the work is done. Unless a run holds that key's lock.

In an ``s3://`` store, also the bucket's ``_work/<stage>/<key>`` of a published key (what a
stage's parts left there when its driver was killed: :mod:`tasks.parts.exchange`).

What stays: every published artifact, the catalog, Prefect's records, ``.damaged-*``
directories (moved aside for a person to look at; delete them by hand), the scratch
space of keys not published yet (a killed training resumes from it), and the lock files
(empty; deleting one while a run is about to take it would let two runs hold "the" lock).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from storage.artifact import Store
from storage.atomic import TMP_PREFIX, abandoned, exclusive_if_free


@dataclass
class Collected:
    """What a collection removed (or would remove, dry run), with the bytes of each."""

    removed: list[tuple[Path | str, int]] = field(default_factory=list)  # a str: a folder in the bucket
    kept_busy: list[Path] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.removed)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def collect(store: Store, dry_run: bool = False) -> Collected:
    """Remove (or with ``dry_run`` only list) what the module docstring says may go."""
    out = Collected()

    def drop(path: Path) -> None:
        out.removed.append((path, _size(path)))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)

    stages = store.root.iterdir() if store.root.is_dir() else []
    for stage_dir in sorted(p for p in stages if p.is_dir() and not p.name.startswith(("_", "."))):
        for tmp in sorted(stage_dir.glob(f"{TMP_PREFIX}*")):
            if abandoned(tmp.name):
                drop(tmp)
    work = store.root / "_work"
    for stage_dir in sorted(p for p in work.iterdir() if p.is_dir()) if work.is_dir() else []:
        for key_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if not store.is_published(stage_dir.name, key_dir.name):
                continue  # not published yet: a killed run resumes from here
            with exclusive_if_free(store.lock_path(stage_dir.name, key_dir.name)) as free:  # held while deleting
                if free:
                    drop(key_dir)
                else:
                    out.kept_busy.append(key_dir)
    if store.remote is not None:
        _collect_bucket(store, out, dry_run)
    return out


def _collect_bucket(store: Store, out: Collected, dry_run: bool) -> None:
    """The bucket's ``_work/<stage>/<key>`` of published keys: parts that Ray nodes and a
    driver exchanged (:mod:`tasks.parts.exchange`) and a killed driver left behind. A key not
    published may be a stage running on another machine now: it stays."""
    bucket = store.remote
    for stage in bucket.list_dirs("_work"):
        for key in bucket.list_dirs(f"_work/{stage}"):
            if store.is_published(stage, key):
                rel = f"_work/{stage}/{key}"
                out.removed.append((f"{bucket.url}/{rel}", bucket.tree_bytes(rel)))
                if not dry_run:
                    bucket.delete_tree(rel)
