"""Dedup stage: drop exact duplicates, then MinHash near-duplicates, keeping one per cluster.

Design decisions:

- Exact duplicates are documents whose normalized text (:func:`tasks.text.minhash.normalize`:
  case, diacritics, digits, punctuation and whitespace folded) hashes the same
  (BLAKE2b-128). Only the first of each group goes on to MinHash, so its signature is
  computed once.
- Near duplicates follow FineWeb/datatrove: word 5-gram shingles, 112 = 14 bands x 8
  rows, no verification by default (a pair sharing one band is a duplicate; the
  candidate probability is 56/77/92/99% at Jaccard 0.7/0.75/0.8/0.85). Set
  ``verify_threshold`` to union only candidate pairs whose exact shingle Jaccard
  reaches it (text-dedup's false-positive check); it costs a second read of the
  candidates' texts.
- Band keys go to ``bands-*.parquet`` in the artifact (doc_id, band, band_hash as
  uint64), one part per input batch, for every document that reached MinHash (kept or
  near-dropped). Candidates come from DuckDB's ``GROUP BY band, band_hash HAVING
  count(*) > 1`` over those files, which spills to disk instead of holding an in-memory
  LSH index; later runs can reuse the files to dedup new documents against this corpus
  (``meta["minhash"]`` records the parameters their keys must match).
- Clusters are connected components (union-find) of the candidate pairs; a bucket adds
  the pairs (its first document, each other member). The document kept is the **first
  in artifact order** (for a crawl: the page reached first, nearest the seeds); its
  doc_id is the ``cluster_id`` of every member, kept or dropped, exact twins included.
  A singleton's cluster_id is its own doc_id.
- ``duplicate_of`` names what a dropped document duplicates: an exact duplicate's
  first twin, a near duplicate's kept document. Following it always ends at a kept doc
  (for the ``seen_*`` reasons below, one kept by an earlier run).
- Every document's content hash goes to ``hashes-*.parquet`` (doc_id, hash: the
  16-byte BLAKE2b of its normalized text), beside its band keys, so that later runs
  can dedup against this corpus exactly as well as approximately.
- Incremental refresh: ``earlier`` lists the dedup artifacts of the dataset being
  extended (its lineage). A new document whose hash is in their ``hashes-*`` is
  ``seen_exact``; one that shares a band key with their ``bands-*`` is ``seen_near``
  (two DuckDB joins over the files, no index in memory); ``duplicate_of`` is the earlier
  document, its own doc_id first when it matches, so a changed page whose new text is
  close to its old version reads "seen_near, duplicate of itself" and the old version
  stays. Seen documents leave before clustering: they neither anchor a cluster of new
  documents nor are kept, and an exact twin of one inherits its reason. Band keys only
  compare under the same MinHash parameters (``meta["minhash"]``): an earlier artifact
  with others is an error, not a silent miss. A substantially changed page (same URL,
  hence same doc_id) passes, and the shards stage lets it replace its old version.
- Memory holds one batch of texts plus, per document, its id and a 16-byte content
  hash; texts are streamed twice (three times with verification).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from storage.artifact import ArtifactWriter, Manifest, Store, iter_batches
from storage.documents import Funnel
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, require_columns, stage_logger
from tasks.text import minhash

STAGE = Stage("dedup", __name__)
PART_ROWS = 20_000
log = stage_logger(STAGE.name)


class DedupConfig(StageConfig):
    """Exact and MinHash near-duplicate removal (defaults: datatrove / FineWeb)."""

    exact: bool = Field(True, description="Drop documents whose normalized text equals an earlier document's.")
    near: bool = Field(
        True, description="Drop MinHash near-duplicates (documents sharing an LSH band with an earlier one)."
    )
    ngram: int = Field(5, ge=1, le=64, description="Word n-gram size of the MinHash shingles.")
    num_perm: int = Field(112, ge=2, le=1024, description="MinHash permutations; must equal bands x rows.")
    bands: int = Field(14, ge=1, le=1024, description="LSH bands: more bands catch lower similarities.")
    rows: int = Field(
        8, ge=1, le=64, description="Signature values per band: more rows make the cut-off steeper and higher."
    )
    seed: int = Field(
        1,
        ge=0,
        lt=2**32,
        description="Seed of the MinHash permutations; band keys of two runs only match with the same seed.",
    )
    verify_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="If set, a candidate pair is a duplicate only when its exact shingle Jaccard reaches this (e.g. 0.75); empty: any shared band counts, as in FineWeb.",
    )

    @model_validator(mode="after")
    def _bands_times_rows(self) -> "DedupConfig":
        if self.bands * self.rows != self.num_perm:
            raise ValueError(
                f"bands x rows must equal num_perm: {self.bands} x {self.rows} = {self.bands * self.rows} != {self.num_perm}"
            )
        return self


@dataclass
class _Scan:
    """What the first pass learned about every input row (by row index in artifact order)."""

    ids: list[str] = field(default_factory=list)
    exact_of: list[int] = field(default_factory=list)  # row of the first exact twin; itself if first; -1 for null text
    row_of: dict[str, int] = field(default_factory=dict)  # doc_id -> row, for rows that reached MinHash
    hashes: list[bytes | None] = field(default_factory=list)  # content hash per row (None for null text)
    seen: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (seen_exact | seen_near, earlier doc_id)


class _UnionFind:
    """Union-find over row indices whose root is always the smallest row of its set."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _scan(docs: Manifest, cfg: DedupConfig, w: ArtifactWriter) -> _Scan:
    """Pass 1: exact groups, and the MinHash band keys of each group's first document."""
    scan = _Scan()
    first_of: dict[bytes, int] = {}
    for batch in iter_batches(docs, columns=["doc_id", "text"], batch_size=PART_ROWS):
        band_ids, sigs, hash_ids, hashes = [], [], [], []
        for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()):
            row = len(scan.ids)
            scan.ids.append(doc_id)
            if text is None:
                scan.exact_of.append(-1)
                scan.hashes.append(None)
                continue
            norm = minhash.normalize(text)
            key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            scan.hashes.append(key)
            hash_ids.append(doc_id)
            hashes.append(key)
            if cfg.exact:
                twin = first_of.setdefault(key, row)
                scan.exact_of.append(twin)
                if twin != row:
                    continue
            elif doc_id in scan.row_of:  # same url and text twice: the same document, even without exact dedup
                scan.exact_of.append(scan.row_of[doc_id])
                continue
            else:
                scan.exact_of.append(row)
            if cfg.near:
                scan.row_of[doc_id] = row
                band_ids.append(doc_id)
                sigs.append(minhash.signature(minhash.shingle_hashes(norm, cfg.ngram), cfg.num_perm, cfg.seed))
        if sigs:
            keys = minhash.band_hashes(np.stack(sigs), cfg.bands, cfg.rows)
            w.write_table(
                pa.table(
                    {
                        "doc_id": pa.array(np.repeat(np.array(band_ids, dtype=object), cfg.bands), pa.string()),
                        "band": pa.array(np.tile(np.arange(cfg.bands, dtype=np.int16), len(band_ids))),
                        "band_hash": pa.array(keys.reshape(-1)),
                    }
                ),
                "bands",
            )
        if hashes:
            w.write_table(
                pa.table({"doc_id": pa.array(hash_ids, pa.string()), "hash": pa.array(hashes, pa.binary(16))}), "hashes"
            )
    return scan


def minhash_params(cfg: DedupConfig) -> dict:
    """What band keys depend on: two artifacts' keys compare only when these are equal."""
    return {
        "scheme": minhash.SCHEME,
        "ngram": cfg.ngram,
        "num_perm": cfg.num_perm,
        "bands": cfg.bands,
        "rows": cfg.rows,
        "seed": cfg.seed,
    }


def _files(manifests: list[Manifest], prefix: str) -> list[str]:
    return [
        str(m.path(f.path)) for m in manifests for f in m.files_with_prefix(prefix + "-") if f.path.endswith(".parquet")
    ]


def _check_earlier(store: Store, cfg: DedupConfig, earlier: list[Manifest]) -> None:
    for m in earlier:
        if m.stage != STAGE.name or store.load(m.stage, m.key) is None:
            raise StageError(
                STAGE.name,
                m.ref,
                "an earlier dedup artifact is missing from the store",
                "run a full refresh (incremental off)",
            )
        theirs = m.meta.get("minhash")
        if cfg.near and m.files_with_prefix("bands-") and theirs != minhash_params(cfg):
            raise StageError(
                STAGE.name,
                m.ref,
                f"its band keys were made with MinHash {theirs}, not {minhash_params(cfg)}",
                "restore the dedup settings of the dataset being refreshed, or run a full refresh (incremental off)",
            )


# The earlier document a new one matches: its own doc_id if that matches (a changed page), else the least.
_EARLIER_MATCH = "coalesce(max(e.doc_id) FILTER (WHERE e.doc_id = n.doc_id), min(e.doc_id))"


def _seen_before(new: list[str], old: list[str], key: str, on: str) -> dict[tuple, str]:
    """``key`` columns of the new rows -> the earlier doc_id they match, joining ``on`` columns."""
    if not old or not new:
        return {}
    with tempfile.TemporaryDirectory(prefix="lmforge-dedup-") as tmp:
        con = duckdb.connect(config={"temp_directory": tmp})
        try:
            rows = con.execute(
                f"""SELECT {key}, {_EARLIER_MATCH} FROM read_parquet($new) n JOIN read_parquet($old) e ON {on}
                    GROUP BY ALL""",
                {"new": new, "old": old},
            ).fetchall()
        finally:
            con.close()
    return {tuple(r[:-1]): r[-1] for r in rows}


def _mark_seen(cfg: DedupConfig, scan: _Scan, w: ArtifactWriter, earlier: list[Manifest]) -> dict:
    """Fill ``scan.seen`` with the first-of-group rows that duplicate an earlier artifact's documents."""
    if cfg.exact:
        exact = _seen_before(
            sorted(str(p) for p in w.dir.glob("hashes-*.parquet")),
            _files(earlier, "hashes"),
            "n.doc_id, n.hash",
            "n.hash = e.hash",
        )
        for row, twin in enumerate(scan.exact_of):
            if twin == row and (scan.ids[row], scan.hashes[row]) in exact:
                scan.seen[row] = ("seen_exact", exact[scan.ids[row], scan.hashes[row]])
    if cfg.near:
        near = _seen_before(
            sorted(str(p) for p in w.dir.glob("bands-*.parquet")),
            _files(earlier, "bands"),
            "n.doc_id",
            "n.band = e.band AND n.band_hash = e.band_hash",
        )
        for (doc_id,), of in near.items():
            row = scan.row_of[doc_id]
            scan.seen.setdefault(row, ("seen_near", of))
    reasons = Counter(reason for reason, _ in scan.seen.values())
    return {
        "earlier": [m.ref for m in earlier],
        "seen_exact_first": reasons["seen_exact"],
        "seen_near_first": reasons["seen_near"],
    }


def candidate_buckets(band_files: list[str]) -> list[list[str]]:
    """Distinct groups of doc_ids sharing a (band, band_hash), computed by DuckDB."""
    if not band_files:
        return []
    with tempfile.TemporaryDirectory(prefix="lmforge-dedup-") as tmp:
        con = duckdb.connect(config={"temp_directory": tmp})
        try:
            rows = con.execute(
                """SELECT DISTINCT list(doc_id ORDER BY doc_id) AS docs
                   FROM read_parquet($files) GROUP BY band, band_hash HAVING count(*) > 1""",
                {"files": band_files},
            ).fetchall()
        finally:
            con.close()
    return [r[0] for r in rows]


def _shingle_sets(docs: Manifest, rows: set[int], ngram: int) -> dict[int, np.ndarray]:
    """Exact shingle sets of some rows, read again from the input (for verification)."""
    out: dict[int, np.ndarray] = {}
    row = 0
    for batch in iter_batches(docs, columns=["text"], batch_size=PART_ROWS):
        for text in batch.column("text").to_pylist():
            if row in rows:
                out[row] = np.unique(minhash.shingle_hashes(minhash.normalize(text), ngram))
            row += 1
    return out


def _cluster(docs: Manifest, cfg: DedupConfig, scan: _Scan, buckets: list[list[str]], uf: _UnionFind) -> dict:
    """Union candidate pairs (verified if configured); return counts for the manifest."""
    rows = [[scan.row_of[d] for d in b if scan.row_of[d] not in scan.seen] for b in buckets]
    groups = sorted(sorted(g) for g in rows if len(g) > 1)
    pairs = {(g[0], r) for g in groups for r in g[1:]}
    stats = {"candidate_buckets": len(groups), "candidate_pairs": len(pairs)}
    if cfg.verify_threshold is None:
        for a, b in pairs:
            uf.union(a, b)
        return stats
    shingles = _shingle_sets(docs, {r for g in groups for r in g}, cfg.ngram)
    checked = accepted = 0
    for g in groups:
        for i, a in enumerate(g):
            for b in g[i + 1 :]:
                if uf.find(a) == uf.find(b):
                    continue
                checked += 1
                if minhash.jaccard(shingles[a], shingles[b]) >= cfg.verify_threshold:
                    accepted += 1
                    uf.union(a, b)
    stats.update(verified_pairs=checked, accepted_pairs=accepted)
    return stats


def _decide(row: int, scan: _Scan, uf: _UnionFind) -> tuple[str | None, str | None, str | None]:
    """(cluster_id, dropped_reason or None if kept, duplicate_of) of one input row."""
    twin = scan.exact_of[row]
    if twin < 0:
        return None, "missing_text", None
    if twin in scan.seen:
        reason, earlier = scan.seen[twin]
        return earlier, reason, earlier
    root = uf.find(twin)
    if twin != row:
        return scan.ids[root], "exact_duplicate", scan.ids[twin]
    if root != row:
        return scan.ids[root], "near_duplicate", scan.ids[root]
    return scan.ids[root], None, None


def _write_docs(docs: Manifest, scan: _Scan, uf: _UnionFind, w: ArtifactWriter, funnel: Funnel) -> Counter:
    """Pass 2: every input row to ``part-*`` or ``dropped-*`` with cluster_id (and reason, duplicate_of)."""
    sizes: Counter = Counter()
    row = 0
    for batch in iter_batches(docs, batch_size=PART_ROWS):
        table = pa.Table.from_batches([batch])
        decisions = []
        for text in table.column("text").to_pylist():
            cluster, reason, dup_of = _decide(row, scan, uf)
            decisions.append((cluster, reason, dup_of))
            funnel.seen(text)
            if reason is None:
                funnel.kept(text)
            else:
                funnel.dropped(reason, text)
            if cluster is not None:
                sizes[cluster] += 1
            row += 1
        cluster, reason, dup_of = (list(c) for c in zip(*decisions))
        table = table.append_column("cluster_id", pa.array(cluster, pa.string()))
        keep = pa.array([r is None for r in reason], pa.bool_())
        kept = table.filter(keep)
        if kept.num_rows:
            w.write_table(kept)
        dropped = table.append_column("dropped_reason", pa.array(reason, pa.string()))
        dropped = dropped.append_column("duplicate_of", pa.array(dup_of, pa.string())).filter(pc.invert(keep))
        if dropped.num_rows:
            w.write_table(dropped, "dropped")
    return sizes


def run(store: Store, cfg: DedupConfig, docs: Manifest, earlier: list[Manifest] | None = None) -> Manifest:
    """Drop exact and near duplicates of ``docs`` (and of ``earlier`` dedup artifacts' documents);
    every document gets a ``cluster_id``."""
    b = STAGE.begin(store, cfg, docs=docs, earlier=earlier)  # as passed: Prefect's cache key sees the same value
    earlier = list(earlier or [])
    if b.done:
        return b.done
    require_columns(
        STAGE.name, docs, ["doc_id", "text"], absent=("cluster_id", "duplicate_of"), upstream="the extract stage"
    )
    _check_earlier(store, cfg, earlier)
    started = time.monotonic()
    funnel = Funnel()
    with STAGE.writer(store, b, extra_parents=earlier) as w:
        scan = _scan(docs, cfg, w)
        seen = _mark_seen(cfg, scan, w, earlier) if earlier else {}
        band_files = sorted(str(p) for p in w.dir.glob("bands-*.parquet"))
        buckets = candidate_buckets(band_files)
        uf = _UnionFind()
        stats = _cluster(docs, cfg, scan, buckets, uf) | seen
        sizes = _write_docs(docs, scan, uf, w, funnel)
        w.counters.update(funnel.as_counters())
        w.meta.update(stats)
        w.meta["clusters"] = sum(1 for n in sizes.values() if n > 1)
        w.meta["largest_cluster"] = max(sizes.values(), default=0)
        w.meta["minhash"] = minhash_params(cfg)
    elapsed = time.monotonic() - started
    log.info(
        "dedup: %d docs in, %d kept, %d clusters of duplicates, %d candidate pairs (%.0f docs/s)",
        funnel.docs_in,
        funnel.docs_out,
        w.meta["clusters"],
        stats["candidate_pairs"],
        funnel.docs_in / max(elapsed, 1e-9),
    )
    return w.manifest


task = stage_task(STAGE, run)
