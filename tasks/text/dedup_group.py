"""Dedup's global step: from every part's hashes and band keys to one decision per dropped document.

Its heavy work is maps over slices of the keys, run on the data engine like the per-part
steps (every core, or a Ray cluster): each task reads every part's files for its slice
only and works in a DuckDB of its own under its share of the memory ceiling, past which
it spills to disk (:mod:`tasks.text.spill_db`); a group (a content hash, a band's bucket)
never spans two slices, so the results do not depend on how many. The driver keeps one
DuckDB of the duplicates only (twins, documents seen before, buckets), and Python the
candidate pairs: its memory does not grow with the corpus. The steps, all keyed by a
document's ordinal (its position in the artifact):

1. exact twins, a map over content-hash slices (:func:`twins_slice`): group the content
   hashes (or, without exact dedup, the doc_ids); a group's first ordinal is its
   representative, every other member a ``twin``;
2. documents seen before (incremental runs): a representative whose hash is in an
   earlier artifact's ``hashes-*`` is ``seen_exact`` (in the same map), one sharing a band
   key with its ``bands-*`` is ``seen_near`` (a map over band slices, :func:`seen_band`);
3. candidate buckets, a map over runs of bands (or slices of a band's hashes, for more
   tasks than bands; :func:`bucket_band`), one band at a time in each task:
   representatives not seen before that share a (band, band_hash);
4. connected components of the candidate pairs (the first member of a bucket with each
   other one), by min-label propagation in numpy; a component's root is its smallest
   ordinal, the document first in artifact order. With ``verify_threshold``, pairs are
   checked against their exact shingle Jaccard first (texts of candidates only);
5. decisions, written sorted by ordinal to one Parquet file that each part reads its
   range of: exact twins, documents seen before, and component members that are not
   the root, with ``duplicate_of`` and ``cluster_id`` (the doc_ids come with the twins and
   the buckets: the driver never reads every document's).
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
        self.con.execute("CREATE TABLE twin (ord BIGINT, first BIGINT, first_doc VARCHAR)")
        self.con.execute("CREATE TABLE seen (ord BIGINT, reason VARCHAR, earlier VARCHAR)")
        self.stats: dict = {}

    def __enter__(self) -> "Grouping":
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    def load_exact(self, twin_files: list[str], seen_files: list[str]) -> None:
        """Steps 1 and 2 (exact), from every :func:`twins_slice` task: the ``twin`` (ord, first,
        first_doc) table, and the ``seen`` table's ``seen_exact`` rows."""
        con = self.con
        if twin_files:
            con.execute("INSERT INTO twin SELECT ord, first, first_doc FROM read_parquet($f)", {"f": twin_files})
        if seen_files:
            con.execute("INSERT INTO seen SELECT ord, 'seen_exact', earlier FROM read_parquet($f)", {"f": seen_files})

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
        """The ordinals in ``twin`` and ``seen`` so far, sorted, to ``out``: what the next map's tasks
        leave out (none for :func:`twins_slice`; twins and exact matches for :func:`seen_band`;
        twins and every document seen before for :func:`bucket_band`)."""
        self.con.execute(
            f"COPY (SELECT ord FROM twin UNION SELECT ord FROM seen ORDER BY ord) TO '{sql_path(out)}' (FORMAT parquet)"
        )

    def load_buckets(self, bucket_files: list[str]) -> None:
        """Step 3's results: the ``buckets`` table (band, members sorted) from every :func:`bucket_band`
        task, and ``named`` (ord, doc_id) of every document in a bucket (a component's root is one)."""
        con = self.con
        con.execute("CREATE TABLE buckets (band SMALLINT, members BIGINT[], doc_ids VARCHAR[])")
        if bucket_files:  # read once: ``named`` comes from the table, not from the files again
            con.execute("INSERT INTO buckets SELECT band, members, doc_ids FROM read_parquet($f)", {"f": bucket_files})
        con.execute(
            "CREATE TABLE named AS SELECT DISTINCT unnest(members) AS ord, unnest(doc_ids) AS doc_id FROM buckets"
        )
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
                         coalesce(s.earlier, t.first_doc) AS duplicate_of,
                         coalesce(s.earlier, r.doc_id, t.first_doc) AS cluster_id
                  FROM twin t LEFT JOIN moved m ON m.ord = t.first LEFT JOIN seen s ON s.ord = t.first
                       LEFT JOIN named r ON r.ord = m.root
                  UNION ALL
                  SELECT ord, reason, earlier, earlier FROM seen
                  UNION ALL
                  SELECT m.ord, 'near_duplicate', r.doc_id, r.doc_id FROM moved m JOIN named r ON r.ord = m.root
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
TWINS = "twins.parquet"
SEEN_EXACT = "seen_exact.parquet"


@dataclass(frozen=True)
class Slice:
    """One task of the grouping's maps: the keys that are ``slice`` modulo ``slices`` (of the
    band hash, or of the content hash for the exact step), of bands ``first_band`` to
    ``last_band`` where the keys are band keys. A group (a bucket: one band and band hash; a
    content hash) never spans two slices. ``path`` is the file of excluded ordinals every task
    reads (the data engine's tasks name an input file; empty for the exact step)."""

    index: int
    name: str
    path: str
    first_band: int = 0
    last_band: int = 0
    slice: int = 0
    slices: int = 1


def hash_slices(excluded: str, tasks: int) -> list[Slice]:
    """The exact step's ``tasks`` slices of the content hashes (the groups do not depend on how many)."""
    return [Slice(i, f"hash slice {i + 1}/{tasks}", excluded, slice=i, slices=tasks) for i in range(tasks)]


def band_slices(excluded: str, bands: int, tasks_wanted: int) -> list[Slice]:
    """About ``tasks_wanted`` tasks over ``bands`` bands: runs of whole bands when there are
    fewer tasks than bands, else every band cut into as many hash slices as it takes. The
    buckets, so the artifact, are the same however the bands are cut."""
    if bands <= 0:
        return []
    if tasks_wanted < bands:
        edges = [round(i * bands / tasks_wanted) for i in range(tasks_wanted + 1)]
        return [
            Slice(i, f"bands {lo}-{hi - 1}" if hi - lo > 1 else f"band {lo}", excluded, lo, hi - 1)
            for i, (lo, hi) in enumerate(zip(edges, edges[1:]))
        ]
    slices = -(-tasks_wanted // bands)
    return [
        Slice(b * slices + s, f"band {b} slice {s + 1}/{slices}", excluded, b, b, s, slices)
        for b in range(bands)
        for s in range(slices)
    ]


# The band keys of one task (``n``: this run's), without the excluded ordinals. The slice is
# written into the query as integer literals: as parameters, DuckDB's modulo of the uint64
# band hash took 3 times as long (measured on 300k documents' keys).
_TASKS_KEYS = """n.band = $band AND n.band_hash % {slices} = {slice}
                 AND NOT EXISTS (SELECT 1 FROM read_parquet($excluded) x WHERE x.ord = n.ord)"""


def bucket_band(task: Slice, out: Path, memory_mb: int, *band_files: str) -> dict:
    """Step 3 for one band slice: its candidate buckets (band, members sorted by ordinal) to
    ``out/buckets.parquet``, from every part's ``band_files``; the ordinals in ``task.path``
    (twins, documents seen before) are left out."""
    rows = _query_to_file(
        task,
        out / BUCKETS,
        memory_mb,
        # The shared keys first, by count alone: building lists of every key's ordinals and doc_ids
        # (most keys are one document's) took 3 times as long (measured on 300k documents' keys).
        f"""WITH shared AS (SELECT n.band_hash FROM read_parquet($new) n WHERE {_TASKS_KEYS}
                            GROUP BY n.band_hash HAVING count(*) > 1)
            SELECT n.band, list(n.ord ORDER BY n.ord) AS members, list(n.doc_id ORDER BY n.ord) AS doc_ids
            FROM read_parquet($new) n SEMI JOIN shared s ON n.band_hash = s.band_hash
            WHERE {_TASKS_KEYS} GROUP BY n.band, n.band_hash""",
        new=list(band_files),
    )
    return {"buckets": rows}


def seen_band(task: Slice, out: Path, memory_mb: int, new_files: int, *band_files: str) -> dict:
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
            WHERE {_TASKS_KEYS} AND e.band = $band GROUP BY n.ord""",
        new=list(band_files[:new_files]),
        old=list(band_files[new_files:]),
    )
    return {"seen": rows}


def twins_slice(task: Slice, out: Path, memory_mb: int, by: str, new_files: int, *hash_files: str) -> dict:
    """Steps 1 and 2 (exact) for the documents whose ``by`` (``hash``, or ``doc_id`` without exact
    dedup) hashes to ``task``'s slice: every member of a group but its first (ordinal, first's
    ordinal and doc_id) to ``out/twins.parquet``; with earlier artifacts' ``hashes-*``
    (``hash_files[new_files:]``), the groups' firsts whose hash is among them, with the earlier
    doc_id they match, to ``out/seen_exact.parquet``. A group never spans two slices."""
    if by not in ("hash", "doc_id"):
        raise ValueError(f"exact groups are by hash or doc_id, not {by!r}")
    new, old = list(hash_files[:new_files]), list(hash_files[new_files:])
    mine = f"hash({by}) % {int(task.slices)} = {int(task.slice)}"
    db = SpillingDuckDB(out, memory_mb=memory_mb, threads=1, name="twins.duckdb")
    con = db.con
    try:
        con.execute(f"CREATE TABLE docs AS SELECT ord, doc_id, hash FROM read_parquet($f) WHERE {mine}", {"f": new})
        con.execute(
            f"""CREATE TABLE twin AS
                WITH g AS (SELECT {by} AS k, min(ord) AS first, arg_min(doc_id, ord) AS first_doc FROM docs
                           GROUP BY {by} HAVING count(*) > 1)
                SELECT d.ord, g.first, g.first_doc FROM docs d JOIN g ON d.{by} = g.k WHERE d.ord <> g.first"""
        )
        con.execute(f"COPY twin TO '{sql_path(out / TWINS)}' (FORMAT parquet)")
        seen = 0
        if old:
            con.execute(
                f"""COPY (SELECT n.ord, {_EARLIER_MATCH} AS earlier
                          FROM docs n JOIN read_parquet($old) e ON n.hash = e.hash
                          WHERE hash(e.hash) % {int(task.slices)} = {int(task.slice)} AND {_NOT_TWIN} GROUP BY n.ord)
                    TO '{sql_path(out / SEEN_EXACT)}' (FORMAT parquet)""",
                {"old": old},
            )
            seen = con.execute("SELECT count(*) FROM read_parquet($f)", {"f": str(out / SEEN_EXACT)}).fetchone()[0]
        twins = con.execute("SELECT count(*) FROM twin").fetchone()[0]
    finally:
        db.close()
    return {"twins": twins, "seen_exact": seen}


def _query_to_file(task: Slice, dest: Path, memory_mb: int, select: str, **files: list[str]) -> int:
    """``select`` over ``task``'s band keys, one band at a time (memory follows one band's keys,
    as many as the corpus has documents, not a run of bands'), written to ``dest`` (Parquet);
    its rows. It runs in a DuckDB of its own beside ``dest`` under ``memory_mb``, which is gone
    afterwards with its spill; the result holds duplicates only."""
    db = SpillingDuckDB(dest.parent, memory_mb=memory_mb, threads=1, name=f"{dest.stem}.duckdb", tables=False)
    select = select.format(slices=int(task.slices), slice=int(task.slice))
    try:
        for band in range(task.first_band, task.last_band + 1):
            into = "CREATE TABLE result AS" if band == task.first_band else "INSERT INTO result"
            db.con.execute(f"{into} {select}", {"excluded": task.path, "band": band} | files)
        db.con.execute(f"COPY result TO '{sql_path(dest)}' (FORMAT parquet)")
        return db.con.execute("SELECT count(*) FROM result").fetchone()[0]
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
