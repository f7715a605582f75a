"""Dedup's global step: from every part's hashes and band keys to one decision per dropped document.

It runs in DuckDB on a database file in the stage's work directory, under a memory
ceiling past which DuckDB spills to that directory (:mod:`tasks.text.spill_db`), so its
memory does not grow with the corpus; Python holds only the candidate pairs (duplicates, not
documents). The steps, all keyed by a document's ordinal (its position in the artifact):

1. exact twins: group the content hashes (or, without exact dedup, the doc_ids); a
   group's first ordinal is its representative, every other member a ``twin``;
2. documents seen before (incremental runs): a representative whose hash is in an
   earlier artifact's ``hashes-*`` is ``seen_exact``, one sharing a band key with its
   ``bands-*`` is ``seen_near``;
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

    def seen_before(self, band_files: list[str], old_hashes: list[str], old_bands: list[str]) -> dict:
        """Step 2: mark representatives that duplicate an earlier artifact's documents."""
        con = self.con
        if old_hashes:
            con.execute(
                f"""INSERT INTO seen SELECT n.ord, 'seen_exact', {_EARLIER_MATCH}
                    FROM docs n JOIN read_parquet($old) e ON n.hash = e.hash WHERE {_NOT_TWIN} GROUP BY n.ord""",
                {"old": old_hashes},
            )
        if old_bands and band_files:
            con.execute(
                f"""INSERT INTO seen SELECT n.ord, 'seen_near', {_EARLIER_MATCH}
                    FROM read_parquet($new) n JOIN read_parquet($old) e ON n.band = e.band AND n.band_hash = e.band_hash
                    WHERE {_NOT_TWIN} AND NOT EXISTS (SELECT 1 FROM seen s WHERE s.ord = n.ord) GROUP BY n.ord""",
                {"new": band_files, "old": old_bands},
            )
        counts = dict(con.execute("SELECT reason, count(*) FROM seen GROUP BY reason").fetchall())
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


@dataclass(frozen=True)
class BandSlice:
    """One task of step 3: the documents of band ``band`` whose band hash is ``slice`` modulo
    ``slices`` (a bucket is one band hash, so slices never split a bucket). ``path`` is the
    file of excluded ordinals every task reads (the data engine's tasks name an input file)."""

    index: int
    name: str
    path: str
    band: int
    slice: int
    slices: int


def band_slices(excluded: str, bands: int, tasks_wanted: int) -> list[BandSlice]:
    """Step 3's tasks: every band, cut into as many hash slices as make about ``tasks_wanted``
    tasks in all (the buckets, so the artifact, are the same however many)."""
    slices = max(1, -(-tasks_wanted // max(bands, 1)))
    return [
        BandSlice(b * slices + s, f"band {b} slice {s + 1}/{slices}", excluded, b, s, slices)
        for b in range(bands)
        for s in range(slices)
    ]


def bucket_band(task: BandSlice, out: Path, memory_mb: int, *band_files: str) -> dict:
    """Step 3 for one band slice: its candidate buckets (band, members sorted by ordinal) to
    ``out/buckets.parquet``, from every part's ``band_files``; the ordinals in ``task.path``
    (twins, documents seen before) are left out."""
    db = SpillingDuckDB(out, memory_mb=memory_mb, threads=1, name="bucket.duckdb")
    try:
        db.con.execute(
            f"""COPY (
                  SELECT $band::SMALLINT AS band, list(n.ord ORDER BY n.ord) AS members FROM read_parquet($f) n
                  WHERE n.band = $band AND n.band_hash % $slices = $slice
                    AND NOT EXISTS (SELECT 1 FROM read_parquet($excluded) x WHERE x.ord = n.ord)
                  GROUP BY n.band_hash HAVING count(*) > 1
                ) TO '{sql_path(out / BUCKETS)}' (FORMAT parquet)""",
            {
                "f": list(band_files),
                "band": task.band,
                "slices": task.slices,
                "slice": task.slice,
                "excluded": task.path,
            },
        )
        (buckets,) = db.con.execute("SELECT count(*) FROM read_parquet($f)", {"f": str(out / BUCKETS)}).fetchone()
    finally:
        db.close()
    return {"buckets": buckets}


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
