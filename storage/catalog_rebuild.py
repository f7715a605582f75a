"""Rebuild the catalog from the store: ``lmforge catalog rebuild --store STORE``.

The store is the source of truth and the catalog an index over it (:mod:`storage.catalog`).
A run re-registers what it uses, but a store that several runs, profiles and deploy
targets have written holds more than any one run knows about; after the catalog file is
lost or damaged, or to check that it says what the store says, this recreates all of it:

- ``artifacts``: every published manifest under ``<store>/<stage>/<key>/`` (unpublished
  temporary directories and the store's own ``_work``, ``_locks``, ``_deploy`` are not
  artifacts); on an object store, every artifact in the bucket too, fetched to this
  machine (a new machine's catalog is one rebuild away);
- ``documents`` and ``token_shards``: every shards artifact whose index files are there;
- ``promotions``: every deploy target's ledger under ``<store>/_deploy/`` (and in the bucket).

Design decisions:

- One transaction: readers see the old catalog until the new one is complete, and a
  failure leaves the old one as it was. The rebuild takes the catalog's write lock, so
  it waits for a run that is writing (and a run waits for it).
- A catalog file DuckDB cannot open is moved aside (``catalog.duckdb.damaged-<time>``,
  with its WAL) and a new one is made, since the old one cannot be read anyway.
- A manifest that does not load, or a dataset whose index files are gone, is skipped and
  reported by name; the rest is rebuilt. Files are not re-hashed (that is ``verify``'s
  job, done by every stage that reads an artifact); only their presence is checked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from storage.artifact import ArtifactError, Manifest, Store
from storage.catalog import TABLES, Catalog, CatalogBusy, CatalogError
from storage.promotions import PromotionError, ledger, targets

log = logging.getLogger("lmforge.catalog")


@dataclass
class Rebuilt:
    """What a rebuild put into the catalog, and what it had to leave out (with why)."""

    artifacts: int = 0
    datasets: int = 0
    documents: int = 0
    targets: int = 0
    decisions: int = 0
    skipped: list[str] = field(default_factory=list)
    moved_aside: str | None = None


def published(store: Store, skipped: list[str]) -> list[Manifest]:
    """Every published artifact of the store, by stage then key; unloadable ones go to ``skipped``."""
    out = []
    for stage, key in store.refs():  # on an object store: the bucket's too, fetched here
        try:
            m = store.load(stage, key)
        except (ArtifactError, ValueError, TypeError, KeyError) as e:
            skipped.append(f"{stage}/{key}: its manifest does not load ({e})")
            continue
        if m is not None:
            out.append(m)
    return out


def _index_problem(m: Manifest) -> str | None:
    """Why a shards artifact cannot be indexed (its index files gone or unreadable), or None."""
    for f in m.files_with_prefix("index-"):
        try:
            pq.ParquetFile(m.path(f.path))
        except (OSError, ValueError) as e:
            return f"{m.ref}: index file {f.path} is unreadable ({e})"
    return None


def _open(path: Path, out: Rebuilt) -> Catalog:
    try:
        return Catalog(path)
    except CatalogBusy:
        raise
    except CatalogError as e:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        log.warning("catalog: %s does not open (%s); moving it to %s", path, e, aside)
        os.replace(path, aside)
        wal = path.with_name(path.name + ".wal")
        if wal.exists():
            os.replace(wal, aside.with_name(aside.name + ".wal"))
        out.moved_aside = str(aside)
        return Catalog(path)


def rebuild_catalog(store: Store) -> Rebuilt:
    """Recreate ``store``'s catalog from its manifests, index files and deploy ledgers (see the module docstring)."""
    if store.remote is not None:
        store.root.mkdir(parents=True, exist_ok=True)  # a machine that has no copy of the bucket yet
    elif not store.root.is_dir():
        raise CatalogError(f"no store at {store.root}")
    out = Rebuilt()
    manifests = published(store, out.skipped)
    deploy_targets = targets(store)
    with _open(store.catalog_path, out) as cat, cat.transaction():
        for table in TABLES:
            cat.con.execute(f"DELETE FROM {table}")
        for m in manifests:
            cat.register_artifact(m)
        out.artifacts = len(manifests)
        for m in manifests:
            if m.stage != "shards" or "dtype" not in m.meta:
                continue
            problem = _index_problem(m)
            if problem:
                out.skipped.append(problem)
                continue
            out.documents += cat.index_documents(m)
            out.datasets += 1
        for target in deploy_targets:
            try:
                decisions = [d.to_dict() for d in ledger(store, target)]
            except PromotionError as e:
                out.skipped.append(f"deploy target {target}: {e}")
                continue
            out.decisions += cat.index_promotions(target, decisions)
            out.targets += 1
    log.info("catalog: rebuilt %s: %s", store.catalog_path, json.dumps(out.__dict__))
    return out
