"""Dedup's global step: from every part's hashes and band keys to one decision per dropped document.

It runs in DuckDB on a database file in the stage's work directory, under a memory
ceiling past which DuckDB spills to that directory (:mod:`tasks.text.spill_db`), so its
memory does not grow with the corpus; Python holds only the candidate pairs (duplicates, not
documents). The steps, all keyed by a document's ordinal (its position in the artifact):

1. exact twins: group the content hashes (or, without exact dedup, the doc_ids); a
   group's first ordinal is its representative, every other member a ``twin``;
2. documents seen before (incremental runs): a representative whose hash is in an
   earlier artifact's ``hashes-*`` is ``seen_exact`` (on the driver), one sharing a band
   key with its ``bands-*`` is ``seen_near`` (a map over band slices, :func:`seen_band`,
   as step 3);
3. candidate buckets, a map over bands (and slices of a band's hashes, for more tasks
   than bands): representatives not seen before that share a (band, band_hash), each task
   in a DuckDB of its own under its share of the memory ceiling, reading only its band's
   row groups (:func:`bucket_band`, on the data engine like the per-part steps); the
   driver loads their buckets, which hold duplicates only;
4. connected components of the candidate pairs (the first member of a bucket with each
   other one), by min-label propagation in numpy; a component's root is its smallest
   ordinal, the document first in artifact order. With ``verify_threshold``, pairs are
   checked against their exact shingle Jaccard first (texts of candidates only);
5. decisions, written sorted by ordinal to one Parquet file that each part reads its
   range of: exact twins, documents seen before, and component members that are not
   the root, with ``duplicate_of`` and ``cluster_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.text import minhash
from tasks.text.spill_db import SpillingDuckDB, sql_path

# The earlier document a new one matches: its own doc_id if that matches (a changed page), else the least.
_EARLIER_MATCH = "coalesce(max(e.doc_id) FILTER (WHERE e.doc_id = n.doc_id), min(e.doc_id))"
_NOT_TWIN = "NOT EXISTS (SELECT 1 FROM twin t WHERE t.ord = n.ord)"


class Grouping:
    """The global step over one run's part outputs (see the module docstring)."""

    def __init__(self, work: Path, *, memory_mb: int, threads: int):
        self.work = Path(work)
        self.db = SpillingDuckDB(self.work, memory_mb=memory_mb, threads=threads)
        self.con = self.db.con
        self.stats: dict = {}

    def __enter__(self) -> "Grouping":
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    def exact(self, hash_files: list[str], by: str | None) -> None:
        """Step 1: the ``docs`` (ord, doc_id, hash) and ``twin`` (ord, first) tables; ``by`` is
        ``hash``, ``doc_id`` or None (no twins)."""
        con = self.con
        if hash_files:
            con.execute("CREATE TABLE docs AS SELECT ord, doc_id, hash FROM read_parquet($f)", {"f": hash_files})
        else:
            con.execute("CREATE TABLE docs (ord BIGINT, doc_id VARCHAR, hash BLOB)")
        if by is None:
            con.execute("CREATE TABLE twin (ord BIGINT, first BIGINT)")
        else:
            con.execute(
                f"""CREATE TABLE twin AS
                    WITH g AS (SELECT {by} AS k, min(ord) AS first FROM docs GROUP BY {by} HAVING count(*) > 1)
                    SELECT d.ord, g.first FROM docs d JOIN g ON d.{by} = g.k WHERE d.ord <> g.first"""
            )
        con.execute("CREATE TABLE seen (ord BIGINT, reason VARCHAR, earlier VARCHAR)")

    def seen_exact(self, old_hashes: list[str]) -> None:
        """Step 2, exact: representatives whose content hash is in an earlier artifact's ``hashes-*``."""
        if old_hashes:
            self.con.execute(
                f"""INSERT INTO seen SELECT n.ord, 'seen_exact', {_EARLIER_MATCH}
                    FROM docs n JOIN read_parquet($old) e ON n.hash = e.hash WHERE {_NOT_TWIN} GROUP BY n.ord""",
                {"old": old_hashes},
            )

    def load_seen_near(self, seen_files: list[str]) -> None:
        """Step 2, near, from every :func:`seen_band` task: a document matched in several bands is
        matched to its own doc_id if any band says so, else to the least earlier doc_id."""
        if seen_files:
            self.con.execute(
                """INSERT INTO seen SELECT ord, 'seen_near', CASE WHEN bool_or(own) THEN any_value(doc_id) ELSE min(least) END
                   FROM read_parquet($f) GROUP BY ord""",
                {"f": seen_files},
            )

    def seen_counts(self) -> dict:
        counts = dict(self.con.execute("SELECT reason, count(*) FROM seen GROUP BY reason").fetchall())
        return {"seen_exact_first": counts.get("seen_exact", 0), "seen_near_first": counts.get("seen_near", 0)}

    def excluded(self, out: Path) -> None:
        """The ordinals that no bucket may hold (exact twins, documents seen before), sorted, to ``out``:
        what each :func:`bucket_band` task leaves out."""
        self.con.execute(
            f"COPY (SELECT ord FROM twin UNION SELECT ord FROM seen ORDER BY ord) TO '{sql_path(out)}' (FORMAT parquet)"
        )

    def load_buckets(self, bucket_files: list[str]) -> None:
        """Step 3's results: the ``buckets`` table (band, members sorted) from every :func:`bucket_band` task."""
        con = self.con
        con.execute("CREATE TABLE buckets (band SMALLINT, members BIGINT[])")
        if bucket_files:
            con.execute("INSERT INTO buckets SELECT band, members FROM read_parquet($f)", {"f": bucket_files})
        self.stats["candidate_buckets"] = con.execute("SELECT count(DISTINCT members) FROM buckets").fetchone()[0]

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Each bucket's first member with each other one, distinct: (a, b) with a < b."""
        got = self.con.execute(
            "SELECT DISTINCT a, b FROM (SELECT members[1] AS a, unnest(members[2:]) AS b FROM buckets) ORDER BY a, b"
        ).fetchnumpy()
        a, b = np.asarray(got["a"], dtype=np.int64), np.asarray(got["b"], dtype=np.int64)
        self.stats["candidate_pairs"] = len(a)
        return a, b

    def verified_pairs(self, parts, ngram: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Pairs whose exact shingle Jaccard reaches ``threshold``: within each bucket, every pair
        not already joined is checked (text-dedup's false-positive check)."""
        groups = [g for (g,) in self.con.execute("SELECT DISTINCT members FROM buckets ORDER BY members").fetchall()]
        self.stats["candidate_pairs"] = len({(g[0], r) for g in groups for r in g[1:]})
        shingles = _shingle_sets(parts, {o for g in groups for o in g}, ngram)
        uf = _UnionFind()
        accepted_a, accepted_b = [], []
        checked = 0
        for g in groups:
            for i, a in enumerate(g):
                for b in g[i + 1 :]:
                    if uf.find(a) == uf.find(b):
                        continue
                    checked += 1
                    if minhash.jaccard(shingles[a], shingles[b]) >= threshold:
                        uf.union(a, b)
                        accepted_a.append(a)
                        accepted_b.append(b)
        self.stats.update(verified_pairs=checked, accepted_pairs=len(accepted_a))
        return np.array(accepted_a, dtype=np.int64), np.array(accepted_b, dtype=np.int64)

    def decisions(self, a: np.ndarray, b: np.ndarray, out: Path) -> None:
        """Steps 4 and 5: components of the pairs, then every dropped document's decision, to ``out``."""
        nodes, roots = components(a, b)
        moved = pa.table({"ord": nodes[roots != nodes], "root": roots[roots != nodes]})
        self.con.register("moved_rows", moved)
        self.con.execute("CREATE TABLE moved AS SELECT * FROM moved_rows")
        self.con.unregister("moved_rows")
        self.con.execute(
            f"""COPY (
                  SELECT t.ord, coalesce(s.reason, 'exact_duplicate') AS dropped_reason,
                         coalesce(s.earlier, f.doc_id) AS duplicate_of, coalesce(s.earlier, r.doc_id) AS cluster_id
                  FROM twin t LEFT JOIN moved m ON m.ord = t.first LEFT JOIN seen s ON s.ord = t.first
                       JOIN docs f ON f.ord = t.first JOIN docs r ON r.ord = coalesce(m.root, t.first)
                  UNION ALL
                  SELECT ord, reason, earlier, earlier FROM seen
                  UNION ALL
                  SELECT m.ord, 'near_duplicate', r.doc_id, r.doc_id FROM moved m JOIN docs r ON r.ord = m.root
                  ORDER BY ord
                ) TO '{sql_path(out)}' (FORMAT parquet, ROW_GROUP_SIZE 65536)"""
        )
        size = """count(*) + max(CASE WHEN dropped_reason LIKE 'seen_%' THEN 0 ELSE 1 END)"""
        clusters, largest = self.con.execute(
            f"""SELECT count(*) FILTER (WHERE size > 1), coalesce(max(size), 0)
                FROM (SELECT {size} AS size FROM read_parquet($f) GROUP BY cluster_id)""",
            {"f": str(out)},
        ).fetchone()
        self.stats.update(clusters=clusters, largest_cluster=largest)


BUCKETS = "buckets.parquet"
SEEN = "seen.parquet"


@dataclass(frozen=True)
class BandSlice:
    """One task of steps 2 and 3: bands ``first_band`` to ``last_band``, the documents whose band
    hash is ``slice`` modulo ``slices`` (a bucket is one band and band hash, so no cut splits
    one). ``path`` is the file of excluded ordinals every task reads (the data engine's tasks
    name an input file)."""

    index: int
    name: str
    path: str
    first_band: int
    last_band: int
    slice: int = 0
    slices: int = 1


def band_slices(excluded: str, bands: int, tasks_wanted: int) -> list[BandSlice]:
    """About ``tasks_wanted`` tasks over ``bands`` bands: runs of whole bands when there are
    fewer tasks than bands, else every band cut into as many hash slices as it takes. The
    buckets, so the artifact, are the same however the bands are cut."""
    if bands <= 0:
        return []
    if tasks_wanted < bands:
        edges = [round(i * bands / tasks_wanted) for i in range(tasks_wanted + 1)]
        return [
            BandSlice(i, f"bands {lo}-{hi - 1}" if hi - lo > 1 else f"band {lo}", excluded, lo, hi - 1)
            for i, (lo, hi) in enumerate(zip(edges, edges[1:]))
        ]
    slices = -(-tasks_wanted // bands)
    return [
        BandSlice(b * slices + s, f"band {b} slice {s + 1}/{slices}", excluded, b, b, s, slices)
        for b in range(bands)
        for s in range(slices)
    ]


# The band keys of one task (``n``: this run's), without the excluded ordinals. The slice is
# written into the query as integer literals: as parameters, DuckDB's modulo of the uint64
# band hash took 3 times as long (measured on 300k documents' keys).
_TASKS_KEYS = """n.band BETWEEN $first AND $last AND n.band_hash % {slices} = {slice}
                 AND NOT EXISTS (SELECT 1 FROM read_parquet($excluded) x WHERE x.ord = n.ord)"""


def bucket_band(task: BandSlice, out: Path, memory_mb: int, *band_files: str) -> dict:
    """Step 3 for one band slice: its candidate buckets (band, members sorted by ordinal) to
    ``out/buckets.parquet``, from every part's ``band_files``; the ordinals in ``task.path``
    (twins, documents seen before) are left out."""
    rows = _query_to_file(
        task,
        out / BUCKETS,
        memory_mb,
        f"""SELECT n.band, list(n.ord ORDER BY n.ord) AS members FROM read_parquet($new) n
            WHERE {_TASKS_KEYS} GROUP BY n.band, n.band_hash HAVING count(*) > 1""",
        new=list(band_files),
    )
    return {"buckets": rows}


def seen_band(task: BandSlice, out: Path, memory_mb: int, new_files: int, *band_files: str) -> dict:
    """Step 2, near, for one band slice: the documents of ``band_files[:new_files]`` (this run's)
    that share a band key with ``band_files[new_files:]`` (earlier artifacts'), with whether one
    match is their own doc_id and the least matching doc_id, to ``out/seen.parquet``; the
    ordinals in ``task.path`` (twins, documents seen exactly) are left out."""
    rows = _query_to_file(
        task,
        out / SEEN,
        memory_mb,
        f"""SELECT n.ord, any_value(n.doc_id) AS doc_id, bool_or(e.doc_id = n.doc_id) AS own, min(e.doc_id) AS least
            FROM read_parquet($new) n JOIN read_parquet($old) e ON n.band = e.band AND n.band_hash = e.band_hash
            WHERE {_TASKS_KEYS} AND e.band BETWEEN $first AND $last GROUP BY n.ord""",
        new=list(band_files[:new_files]),
        old=list(band_files[new_files:]),
    )
    return {"seen": rows}


def _query_to_file(task: BandSlice, dest: Path, memory_mb: int, select: str, **files: list[str]) -> int:
    """``select`` over ``task``'s band keys written to ``dest`` (Parquet), in a DuckDB of its own
    beside it under ``memory_mb``; its rows. The database and its spill are gone afterwards."""
    db = SpillingDuckDB(dest.parent, memory_mb=memory_mb, threads=1, name=f"{dest.stem}.duckdb")
    params = {"excluded": task.path, "first": task.first_band, "last": task.last_band}
    try:
        db.con.execute(
            f"COPY ({select.format(slices=int(task.slices), slice=int(task.slice))}) TO '{sql_path(dest)}' (FORMAT parquet)",
            params | files,
        )
        return db.con.execute("SELECT count(*) FROM read_parquet($f)", {"f": str(dest)}).fetchone()[0]
    finally:
        db.close()


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the edges (a[i], b[i]): every node, and its component's smallest node.

    Min-label propagation with pointer jumping, vectorized: memory is a few arrays the
    size of the edge list, whatever the number of documents.
    """
    if not len(a):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: len(a)], inverse[len(a) :]
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[ia], label[ib])
        new = label.copy()
        np.minimum.at(new, ia, low)
        np.minimum.at(new, ib, low)
        while True:  # pointer jumping: every node to its label's label
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


class _UnionFind:
    """Union-find over ordinals whose root is always the smallest of its set."""

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


def _shingle_sets(parts, ordinals: set[int], ngram: int) -> dict[int, np.ndarray]:
    """Exact shingle sets of some documents, read again from their parts (for verification)."""
    out: dict[int, np.ndarray] = {}
    for part in parts:
        wanted = [o - part.start for o in ordinals if part.start <= o < part.start + part.rows]
        if not wanted:
            continue
        texts = pq.read_table(part.path, columns=["text"]).column("text")
        for i in wanted:
            out[part.start + i] = np.unique(minhash.shingle_hashes(minhash.normalize(texts[i].as_py()), ngram))
    return out
