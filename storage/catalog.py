"""The DuckDB catalog: artifact lineage and a queryable index of every tokenized document.

It lives at ``<store>/catalog.duckdb`` and is derived data: everything in it comes from
published manifests and ``index-*.parquet`` files, so deleting it and rerunning the
shards stage (a cache hit) rebuilds it. Design decisions:

- Four tables. ``artifacts`` (one row per artifact: lineage, config, counters, meta),
  ``documents`` (one row per document of a shards artifact, the ``dataset``: metadata
  plus where its tokens are), and ``token_shards`` (one row per ``.bin`` file, with its
  absolute path and dtype). ``documents ⨝ token_shards`` turns a SQL filter into token
  spans, which is how a finetune set or an eval slice is cut without copying data.
  ``promotions`` mirrors the deploy ledgers (:mod:`storage.promotions`): one row per
  decision, with the model and dataset it was about, joinable to ``artifacts`` for lineage.
- Every write is idempotent: ``register_artifact`` upserts, ``index_documents`` deletes
  and reloads a dataset's rows in one transaction.
- DuckDB lets one process at a time open the file for writing. A :class:`Catalog` is
  opened, used and closed within a stage, never held across stages; opening waits up to
  ``lock_timeout`` seconds for another process's lock to go away.
- User filters (:mod:`storage.filters`) are checked, then evaluated in a sandbox that
  holds the rows of one dataset and nothing else: a filter cannot reach other tables,
  files or settings, or run a second statement; a bad one raises :class:`CatalogError`
  naming the filter and the reason in words. Read-only connections (the ones that answer
  users) have external access and extension loading off too.
- The catalog held by another process past ``lock_timeout`` is :class:`CatalogBusy`, a
  transient condition that callers retry, not a bad request.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from storage.artifact import Manifest, Store
from storage.filters import SANDBOX, FilterError, apply_filter

log = logging.getLogger("lmforge.catalog")

DOCUMENT_INDEX = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("lang_score", pa.float64()),
        pa.field("signals", pa.string(), metadata={"duckdb": "JSON"}),
        pa.field("cluster_id", pa.string()),
        pa.field("augmented_from", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("start", pa.int64(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("n_bytes", pa.int64(), nullable=False),
    ]
)
"""One row per document of a dataset: what the shards stage writes as ``index-*.parquet``
and what the ``documents`` table holds (plus its ``dataset``). The one spelling of it."""
DOCUMENT_COLUMNS = DOCUMENT_INDEX.names
_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT"}


def _column_ddl(field: pa.Field) -> str:
    typ = (field.metadata or {}).get(b"duckdb", b"").decode() or _DUCKDB_TYPES[field.type]
    return f"{field.name} {typ}" + ("" if field.nullable else " NOT NULL")


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS artifacts (
        ref VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, key VARCHAR NOT NULL, parents VARCHAR[],
        config JSON, code_version VARCHAR, created_at TIMESTAMPTZ, counters JSON, meta JSON, root VARCHAR,
        n_files INTEGER, bytes BIGINT)""",
    "CREATE TABLE IF NOT EXISTS documents (dataset VARCHAR NOT NULL, "
    + ", ".join(_column_ddl(f) for f in DOCUMENT_INDEX)
    + ")",
    """CREATE TABLE IF NOT EXISTS token_shards (
        dataset VARCHAR NOT NULL, shard VARCHAR NOT NULL, split VARCHAR NOT NULL, path VARCHAR NOT NULL,
        dtype VARCHAR NOT NULL, n_docs BIGINT, n_tokens BIGINT, PRIMARY KEY (dataset, shard))""",
    """CREATE TABLE IF NOT EXISTS promotions (
        target VARCHAR NOT NULL, seq INTEGER NOT NULL, action VARCHAR NOT NULL, export VARCHAR NOT NULL,
        previous VARCHAR, serving VARCHAR, reason VARCHAR, metrics JSON, model VARCHAR, dataset VARCHAR,
        lineage JSON, decided_at TIMESTAMPTZ, run VARCHAR, PRIMARY KEY (target, seq))""",
]
TABLES = ("artifacts", "documents", "token_shards", "promotions")  # every table SCHEMA makes, all derived


class CatalogError(RuntimeError):
    """A catalog request cannot be answered; the message says which request and why."""


class CatalogBusy(CatalogError):
    """Another process holds the catalog's write lock: try again later."""


class Catalog:
    """The catalog file, open for one unit of work: ``with Catalog(store.catalog_path) as cat: ...``."""

    def __init__(self, path: str | Path, *, read_only: bool = False, lock_timeout: float = 60.0):
        self.path = Path(path)
        self._depth = 0  # nesting of transaction()
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run the shards stage to create it")
        self.con = _connect(self.path, read_only, lock_timeout)
        if not read_only:
            for ddl in SCHEMA:
                self.con.execute(ddl)

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # --- lineage ---------------------------------------------------------------------

    def register_artifact(self, manifest: Manifest) -> None:
        """Insert or update one artifact's row."""
        self.con.execute(
            "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                manifest.ref,
                manifest.stage,
                manifest.key,
                list(manifest.parents),
                json.dumps(manifest.config, default=str),
                manifest.code_version,
                manifest.created_at,
                json.dumps(manifest.counters, default=str),
                json.dumps(manifest.meta, default=str),
                manifest.root,
                len(manifest.files),
                sum(f.bytes for f in manifest.files),
            ],
        )

    def register_lineage(self, store: Store, manifest: Manifest) -> list[str]:
        """Register an artifact and all its ancestors; return the refs registered.

        Parents are ``stage/key`` refs loaded from ``store``. An ancestor no longer in the
        store is logged and skipped; its ref stays in its child's ``parents``.
        """
        seen: set[str] = set()
        todo = [manifest]
        with self.transaction():
            while todo:
                m = todo.pop()
                if m.ref in seen:
                    continue
                seen.add(m.ref)
                self.register_artifact(m)
                for ref in m.parents:
                    stage, _, key = ref.partition("/")
                    parent = store.load(stage, key)
                    if parent is None:
                        log.warning("catalog: ancestor %s of %s is not in the store %s", ref, m.ref, store.root)
                    elif parent.ref not in seen:
                        todo.append(parent)
        return sorted(seen)

    def lineage(self, ref: str) -> list[dict[str, Any]]:
        """Every registered ancestor of ``ref``, nearest first (depth 1 = a parent)."""
        self._require_artifact(ref)
        rows = self.con.execute(
            """WITH RECURSIVE anc(ref, depth) AS (
                   SELECT unnest(parents), 1 FROM artifacts WHERE ref = $1
                   UNION
                   SELECT unnest(a.parents), anc.depth + 1 FROM artifacts a JOIN anc ON a.ref = anc.ref)
               SELECT anc.ref, a.stage, a.key, min(anc.depth) AS depth, a.code_version, a.created_at
               FROM anc LEFT JOIN artifacts a ON a.ref = anc.ref
               GROUP BY ALL ORDER BY depth, anc.ref""",
            [ref],
        ).fetchall()
        keys = ["ref", "stage", "key", "depth", "code_version", "created_at"]
        return [dict(zip(keys, r)) for r in rows]

    # --- promotions ------------------------------------------------------------------

    def index_promotions(self, target: str, decisions: Sequence[dict[str, Any]]) -> int:
        """Replace ``target``'s rows with its ledger's decisions (dicts of :class:`storage.promotions.Decision`)."""
        rows = [
            [
                target,
                d["seq"],
                d["action"],
                d["export"],
                d["previous"],
                d["serving"],
                d["reason"],
                json.dumps(d["metrics"], default=str),
                d["lineage"].get("model"),
                d["lineage"].get("dataset"),
                json.dumps(d["lineage"], default=str),
                d["decided_at"] or None,
                d["run"],
            ]
            for d in decisions
        ]
        with self.transaction():
            self.con.execute("DELETE FROM promotions WHERE target = ?", [target])
            if rows:
                self.con.executemany("INSERT INTO promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    # --- documents -------------------------------------------------------------------

    def index_documents(self, manifest: Manifest) -> int:
        """(Re)load a shards artifact's document index and shard list; return the document count."""
        files = [
            str(manifest.path(f.path)) for f in manifest.files_with_prefix("index-") if f.path.endswith(".parquet")
        ]
        if not files or "dtype" not in manifest.meta:
            raise CatalogError(f"artifact {manifest.ref} has no index-*.parquet or token dtype: not a shards artifact")
        dtype = manifest.meta["dtype"]
        shards = [
            (
                manifest.ref,
                f.path,
                f.path.split("-")[1],
                str(manifest.path(f.path)),
                dtype,
                f.rows,
                f.bytes // np.dtype(dtype).itemsize,
            )
            for f in manifest.files_with_prefix("tokens-")
            if f.path.endswith(".bin")
        ]
        cols = ", ".join(DOCUMENT_COLUMNS)
        try:
            with self.transaction():
                self.con.execute("DELETE FROM documents WHERE dataset = ?", [manifest.ref])
                self.con.execute("DELETE FROM token_shards WHERE dataset = ?", [manifest.ref])
                self.con.execute(
                    f"INSERT INTO documents SELECT $1 AS dataset, {cols} FROM read_parquet($2)", [manifest.ref, files]
                )
                if shards:
                    self.con.executemany("INSERT INTO token_shards VALUES (?, ?, ?, ?, ?, ?, ?)", shards)
                return self._scalar("SELECT count(*) FROM documents WHERE dataset = ?", [manifest.ref])
        except duckdb.Error as e:
            raise CatalogError(
                f"cannot index artifact {manifest.ref}: {str(e).splitlines()[0]} (the catalog keeps its previous rows)"
            ) from e

    def datasets(self) -> list[str]:
        """Refs of the indexed datasets, oldest first (by their artifact's creation time)."""
        rows = self.con.execute(
            """SELECT a.ref FROM artifacts a WHERE a.stage = 'shards'
                 AND EXISTS (SELECT 1 FROM documents d WHERE d.dataset = a.ref)
               ORDER BY a.created_at, a.ref"""
        ).fetchall()
        return [r[0] for r in rows]

    def has_dataset(self, dataset_ref: str) -> bool:
        """Whether a shards artifact's documents are indexed."""
        return self._scalar("SELECT EXISTS (SELECT 1 FROM documents WHERE dataset = ?)", [dataset_ref])

    def select_documents(self, dataset_ref: str, where_sql: str | None = None, split: str | None = None) -> pa.Table:
        """Documents of one dataset matching a SQL filter (e.g. ``"lang = 'fr'"``), with token locations.

        Columns: the ``documents`` columns plus ``path`` and ``dtype`` of each document's
        shard, ordered by shard and offset (the order that reads the shards sequentially).
        """
        if not self.has_dataset(dataset_ref):
            raise CatalogError(
                f"dataset {dataset_ref!r} is not indexed in {self.path}: run the shards stage that produces it"
            )
        rows = self.con.sql(
            """SELECT d.* EXCLUDE (dataset), s.path, s.dtype
               FROM documents d JOIN token_shards s USING (dataset, shard)
               WHERE d.dataset = $1 AND ($2::VARCHAR IS NULL OR d.split = $2)
               ORDER BY shard, start""",
            params=[dataset_ref, split],
        ).to_arrow_table()
        if where_sql is None:
            return rows
        try:
            return apply_filter(rows, where_sql, DOCUMENT_COLUMNS)
        except FilterError as e:
            raise CatalogError(
                f"documents filter {where_sql!r} is not valid: {e} "
                f"(columns: {', '.join(DOCUMENT_COLUMNS)}; e.g. \"lang = 'fr' AND lang_score > 0.9\")"
            ) from None

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run any SQL over the catalog; an Arrow table of the result (empty for statements)."""
        rel = self.con.sql(sql, params=params)
        return rel.to_arrow_table() if rel is not None else pa.table({})

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; inside another, part of the outer one (readers see all of it or none)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.con.execute("BEGIN TRANSACTION")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        self.con.execute("COMMIT")

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        # fetchall, not fetchone: duckdb 2.0 refuses new work while a result is unfinished.
        return self.con.execute(sql, params).fetchall()[0][0]

    def _require_artifact(self, ref: str) -> None:
        if not self._scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE ref = ?)", [ref]):
            raise CatalogError(f"artifact {ref!r} is not registered in {self.path}")


def register_dataset(store: Store, manifest: Manifest) -> None:
    """Record a shards artifact and its lineage in the store's catalog; index its documents once.

    Idempotent and cheap when nothing changed, so the flow that owns the catalog calls it
    on every run, cached or not: a deleted catalog is rebuilt by the next run.
    """
    with Catalog(store.catalog_path) as cat:
        cat.register_lineage(store, manifest)
        if not cat.has_dataset(manifest.ref):
            cat.index_documents(manifest)


def token_spans(table: pa.Table) -> list[tuple[str, int, int]]:
    """``(shard path, start, n_tokens)`` of each row of :meth:`Catalog.select_documents`.

    Feed them to :func:`storage.tokens.read_spans` with the table's ``dtype`` to
    materialize a subset (each span ends with the EOT id).
    """
    missing = {"path", "start", "n_tokens"} - set(table.column_names)
    if missing:
        raise CatalogError(f"token_spans needs columns path, start, n_tokens; the table lacks {sorted(missing)}")
    return list(
        zip(table.column("path").to_pylist(), table.column("start").to_pylist(), table.column("n_tokens").to_pylist())
    )


def _connect(path: Path, read_only: bool, lock_timeout: float) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting while another process holds its lock."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=SANDBOX if read_only else {})
        except duckdb.IOException as e:
            busy = "lock" in str(e).lower()
            if not busy or time.monotonic() >= deadline:
                kind = CatalogBusy if busy else CatalogError
                raise kind(f"cannot open the catalog {path}: {str(e).splitlines()[0]}") from e
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
