"""Dedup stage: planted exact and near duplicates found, distinct documents left alone, bands grouped by DuckDB."""

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from storage.artifact import Store, read_table
from storage.documents import make_doc_id
from tasks import dedup
from tasks.parts.core import Execution, input_parts
from tasks.parts.partmap import _biggest_first
from tasks.stage import StageError
from tasks.text import minhash
from tasks.text.dedup_group import BUCKETS, TWINS, band_slices, bucket_band, components, hash_slices, twins_slice

ROOT = Path(__file__).resolve().parents[2]
RNG = random.Random(7)
VOCAB = sorted({"".join(RNG.choice("abcdefghiklmnoprstuvwy") for _ in range(RNG.randint(3, 9))) for _ in range(3000)})


def words(n, rng):
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(ws, positions, rng):
    """A copy with the words at ``positions`` replaced: Jaccard of 5-grams stays above 0.9 for 2 edits in 300 words."""
    ws = list(ws)
    for p in positions:
        ws[p] = rng.choice(VOCAB) + "x"
    return ws


def corpus():
    """(url, text) rows and the expected outcome, in artifact order.

    - 40 distinct 300-word documents (d0..d39);
    - near duplicates: d0 has two edited copies after it, d1 one; d2's edited copy comes
      *before* d2, so the copy is the one kept;
    - exact duplicates by case, whitespace and punctuation: of d3, of d4, and of d0's first
      copy (an exact twin of a near duplicate);
    - distinct look-alikes: d5 and d6 share their first 40% of words (Jaccard ~0.25);
    - short texts under 5 words: "Hello, world!" and its exact twin; "Hello there" (distinct);
    - a null text.
    """
    rng = random.Random(1)
    base = [words(300, rng) for _ in range(40)]
    base[6] = base[5][:120] + words(180, rng)
    text = {f"d{i}": " ".join(ws) for i, ws in enumerate(base)}
    text["d0_a"] = " ".join(edit(base[0], [50, 200], rng))
    text["d0_b"] = " ".join(edit(base[0], [10, 150], rng))
    text["d1_a"] = " ".join(edit(base[1], [100, 250], rng))
    text["d2_a"] = " ".join(edit(base[2], [30, 270], rng))
    text["d3_x"] = text["d3"].upper()
    text["d4_x"] = "  " + text["d4"].replace(" ", "\n\t ", 20) + "\n"
    text["d0_a_x"] = text["d0_a"].replace(" ", ", ", 10).title()
    text["s1"], text["s1_x"], text["s2"] = "Hello, world!", "hello   WORLD", "Hello there"
    text["null"] = None
    order = (
        ["d2_a"]
        + [f"d{i}" for i in range(40)]
        + ["d0_a", "d0_b", "d1_a", "d3_x", "d4_x", "d0_a_x", "s1", "s1_x", "s2", "null"]
    )
    return [(name, text[name]) for name in order]


def publish(store, rows, key="docs", per_part=16):
    table = [
        {
            "doc_id": make_doc_id(f"https://example.org/{name}", t or ""),
            "url": f"https://example.org/{name}",
            "source": "test",
            "fetched_at": "2026-11-01T00:00:00Z",
            "text": t,
        }
        for name, t in rows
    ]
    with store.writer("extract", key) as w:
        for i in range(0, len(table), per_part):
            w.write_table(pa.Table.from_pylist(table[i : i + per_part]))
    return w.manifest, {name: row["doc_id"] for (name, _), row in zip(rows, table)}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("dedup"))
    docs, ids = publish(store, corpus())
    return store, docs, ids, dedup.run(store, dedup.DedupConfig(), docs=docs)


def by_name(table, ids):
    names = {v: k for k, v in ids.items()}
    return {names[r["doc_id"]]: r for r in table.to_pylist()}


def test_planted_duplicates_found_and_distinct_docs_kept(result):
    _, _, ids, m = result
    assert m.counters["docs_in"] == 51
    assert {r: v["docs"] for r, v in m.counters["dropped"].items()} == {
        "exact_duplicate": 4,
        "near_duplicate": 4,
        "missing_text": 1,
    }
    kept = by_name(read_table(m), ids)
    assert set(kept) == {"d2_a", "s1", "s2"} | {f"d{i}" for i in range(40) if i != 2}
    dropped = by_name(read_table(m, "dropped"), ids)
    expected = {  # name: (reason, duplicate_of, cluster)
        "d0_a": ("near_duplicate", "d0", "d0"),
        "d0_b": ("near_duplicate", "d0", "d0"),
        "d1_a": ("near_duplicate", "d1", "d1"),
        "d2": ("near_duplicate", "d2_a", "d2_a"),
        "d3_x": ("exact_duplicate", "d3", "d3"),
        "d4_x": ("exact_duplicate", "d4", "d4"),
        "d0_a_x": ("exact_duplicate", "d0_a", "d0"),
        "s1_x": ("exact_duplicate", "s1", "s1"),
    }
    for name, (reason, dup_of, cluster) in expected.items():
        row = dropped[name]
        assert (row["dropped_reason"], row["duplicate_of"], row["cluster_id"]) == (reason, ids[dup_of], ids[cluster]), (
            name
        )
    assert dropped["null"]["dropped_reason"] == "missing_text" and dropped["null"]["cluster_id"] is None
    assert all(row["cluster_id"] == row["doc_id"] for row in kept.values())  # a kept doc names its own cluster
    assert m.meta["clusters"] == 6  # d0 (4 docs), d1, d2_a, d3, d4, s1
    assert m.meta["largest_cluster"] == 4


def test_bands_are_grouped_by_duckdb(result):
    _, _, ids, m = result
    bands = [str(m.path(f.path)) for f in m.files_with_prefix("bands-")]
    assert len(bands) == 4  # one per input part (51 rows in parts of 16)
    con = duckdb.connect()
    n, per_doc = con.execute(
        "SELECT count(*), count(*) / count(DISTINCT doc_id) FROM read_parquet($f)", {"f": bands}
    ).fetchone()
    # Signed: 51 rows - 1 null - d0_a_x (an exact twin of d0_a, earlier in its own part). Twins of documents
    # in other parts (d3_x, d4_x, s1_x) are signed too; the global grouping leaves them out of the buckets.
    assert (n, per_doc) == (49 * 14, 14)
    pairs = con.execute(
        """WITH b AS (SELECT list(doc_id ORDER BY doc_id) AS docs FROM read_parquet($f)
                      GROUP BY band, band_hash HAVING count(*) > 1)
           SELECT DISTINCT unnest(docs) AS d, docs FROM b""",
        {"f": bands},
    ).fetchall()
    names = {v: k for k, v in ids.items()}
    groups = {frozenset(names[d] for d in docs) for _, docs in pairs}
    twins_across_parts = {"d3", "d3_x", "d4", "d4_x", "s1", "s1_x"}  # in the files, left out of the stage's buckets
    assert set().union(*groups) == {"d0", "d0_a", "d0_b", "d1", "d1_a", "d2", "d2_a"} | twins_across_parts
    assert m.meta["candidate_pairs"] == 4


def run_with(tmp_path, name, execution, **env):
    """The planted corpus deduplicated in a store of its own, with ``execution`` and the environment ``env``."""
    store = Store(tmp_path / name)
    docs, _ = publish(store, corpus())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        return dedup.run(store, dedup.DedupConfig(), docs=docs, execution=execution)


def test_results_do_not_depend_on_workers_or_memory_ceiling(result, tmp_path):
    _, _, _, m = result
    one = run_with(tmp_path, "one", Execution(workers=1))
    two = run_with(tmp_path, "two", Execution(workers=2, memory_mb=64))
    assert one.key == two.key == m.key
    assert one.digest() == two.digest() == m.digest()  # the same files, byte for byte
    assert (one.meta["execution"]["workers"], two.meta["execution"]["workers"]) == (1, 2)
    assert not (Path(one.root) / "_work" / "dedup" / one.key).exists()  # the checkpoints go once published


@pytest.mark.parametrize(
    "point, name",
    [("sign/1", "part-00001.parquet"), ("buckets-4/3", "bands 10-13")],
    ids=["a part being signed", "a band being bucketed"],
)
def test_a_killed_worker_costs_its_part_only(result, tmp_path, caplog, point, name):
    """SIGKILL a worker with its task's outputs written but not published (part 1 signed, or the
    buckets of the last of 4 band runs): that task is redone, alone, and named in the log."""
    _, _, _, m = result
    logging.getLogger("lmforge.dedup").addHandler(caplog.handler)  # Prefect may stop lmforge loggers propagating
    try:
        marker = tmp_path / "killed"
        out = run_with(
            tmp_path, "kill", Execution(workers=2), LMFORGE_KILL_AT=f"dedup/{point}", LMFORGE_KILL_MARKER=str(marker)
        )
    finally:
        logging.getLogger("lmforge.dedup").removeHandler(caplog.handler)
    assert marker.read_text().startswith(f"dedup/{point} ")
    assert out.digest() == m.digest()
    assert out.meta["execution"]["retried_parts"] == [f"{point.split('/')[0]} {name}"]
    assert f"the worker on {name} died (exit code -9); retrying that part alone" in caplog.text


def test_band_slices_split_a_band_without_splitting_a_bucket(result, tmp_path):
    """Step 3 cut into runs of bands, one task per band, or 3 hash slices per band: the same buckets, spread over the tasks."""
    _, _, _, m = result
    bands = [str(m.path(f.path)) for f in m.files_with_prefix("bands-")]
    excluded = tmp_path / "excluded.parquet"
    pq.write_table(pa.table({"ord": pa.array([], pa.int64())}), excluded)

    def buckets(tasks_wanted):
        found = {}
        for task in band_slices(str(excluded), 14, tasks_wanted):
            out = tmp_path / f"{tasks_wanted}-{task.index}"
            out.mkdir()
            assert bucket_band(task, out, 64, *bands)["buckets"] == pq.read_table(out / BUCKETS).num_rows
            found[task.name] = {
                (b, tuple(ms)) for b, ms in duckdb.sql(f"SELECT band, members FROM '{out / BUCKETS}'").fetchall()
            }
            assert not any(p.name.endswith((".duckdb", "spill")) for p in out.iterdir())  # its scratch is gone
        return found

    runs, whole, sliced = buckets(4), buckets(14), buckets(42)
    assert list(runs) == ["bands 0-3", "bands 4-6", "bands 7-9", "bands 10-13"]
    assert len(whole) == 14 and len(sliced) == 42 and sliced.keys() >= {"band 0 slice 3/3", "band 13 slice 1/3"}
    assert set().union(*sliced.values()) == set().union(*whole.values()) == set().union(*runs.values())
    assert sum(map(len, sliced.values())) == sum(map(len, whole.values())) > 14  # no bucket in two tasks
    assert sum(1 for found in sliced.values() if found) > sum(1 for found in whole.values() if found)


def test_a_killed_run_redoes_only_unfinished_parts(result, tmp_path, caplog):
    """The whole run killed in its third part (one worker, in process): the rerun reuses the
    two parts that finished before it (a map starts its biggest parts first)."""
    _, _, _, m = result
    store = Store(tmp_path / "s")
    docs, _ = publish(store, corpus())
    third = sorted(input_parts(docs), key=_biggest_first)[2].index
    script = (
        "import sys; from storage.artifact import Store; from tasks import dedup; from tasks.parts.core import Execution\n"
        "store = Store(sys.argv[1]); docs = store.load('extract', 'docs')\n"
        "dedup.run(store, dedup.DedupConfig(), docs=docs, execution=Execution(workers=1))\n"
    )
    env = os.environ | {"LMFORGE_KILL_AT": f"dedup/sign/{third}", "LMFORGE_KILL_MARKER": str(tmp_path / "killed")}
    done = subprocess.run([sys.executable, "-c", script, str(store.root)], env=env, cwd=ROOT, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert store.load("dedup", m.key) is None  # nothing published
    logging.getLogger("lmforge.dedup").addHandler(caplog.handler)
    try:
        out = dedup.run(store, dedup.DedupConfig(), docs=docs, execution=Execution(workers=1))
    finally:
        logging.getLogger("lmforge.dedup").removeHandler(caplog.handler)
    assert "sign: 2 of 4 parts already done, reusing them" in caplog.text
    assert out.digest() == m.digest()


def test_a_bad_part_names_itself(tmp_path):
    """A part whose text column is not text fails the stage naming that part and its file."""
    store = Store(tmp_path)
    with store.writer("extract", "bad") as w:
        w.write_table(pa.table({"doc_id": ["a"], "url": ["u"], "source": ["s"], "fetched_at": ["t"], "text": ["ok"]}))
        w.write_table(pa.table({"doc_id": ["b"], "url": ["u"], "source": ["s"], "fetched_at": ["t"], "text": [7]}))
    with pytest.raises(StageError, match=r"\[dedup\] part-00001.parquet \(.*part-00001.parquet\): sign failed"):
        dedup.run(store, dedup.DedupConfig(), docs=w.manifest, execution=Execution(workers=2))


def test_exact_twins_do_not_depend_on_the_hash_slices(result, tmp_path):
    """Step 1 as one task or three slices of the content hashes: the same twins, each with its group's first."""
    _, _, ids, m = result
    hashes = [str(m.path(f.path)) for f in m.files_with_prefix("hashes-")]
    names = {v: k for k, v in ids.items()}

    def twins(n):
        found = set()
        for task in hash_slices("", n):
            out = tmp_path / f"{n}-{task.index}"
            out.mkdir()
            twins_slice(task, out, 64, "hash", len(hashes), *hashes)
            rows = pq.read_table(out / TWINS).to_pylist()
            found |= {(r["ord"], r["first"], names[r["first_doc"]]) for r in rows}
        return found

    one, three = twins(1), twins(3)
    assert one == three and {d for _, _, d in one} == {"d3", "d4", "d0_a", "s1"}
    assert all(first < ordinal for ordinal, first, _ in one)


def test_components_of_pairs_root_at_their_smallest_node():
    """A chain, a star and a lone pair: every node maps to the smallest node of its component."""
    a = np.array([9, 7, 5, 3, 20, 20, 20, 100], dtype=np.int64)
    b = np.array([11, 9, 7, 5, 21, 22, 23, 101], dtype=np.int64)
    nodes, roots = components(a, b)
    assert dict(zip(nodes.tolist(), roots.tolist())) == {
        3: 3, 5: 3, 7: 3, 9: 3, 11: 3, 20: 20, 21: 20, 22: 20, 23: 20, 100: 100, 101: 100
    }  # fmt: skip
    assert [len(x) for x in components(np.zeros(0, np.int64), np.zeros(0, np.int64))] == [0, 0]


def test_rerun_is_cached_and_config_changes_key(result):
    store, docs, _, m = result
    assert dedup.run(store, dedup.DedupConfig(), docs=docs).created_at == m.created_at
    no_near = dedup.run(store, dedup.DedupConfig(near=False), docs=docs)
    assert no_near.key != m.key and not no_near.files_with_prefix("bands-")
    assert {r: v["docs"] for r, v in no_near.counters["dropped"].items()} == {"exact_duplicate": 4, "missing_text": 1}


def test_verification_rejects_low_jaccard_candidates(tmp_path):
    """With 56 bands x 2 rows, a pair at Jaccard ~0.33 is a candidate; verification at 0.8 rejects it."""
    rng = random.Random(3)
    a = words(300, rng)
    rows = [("a", " ".join(a)), ("half", " ".join(a[:150] + words(150, rng))), ("copy", " ".join(edit(a, [100], rng)))]
    store = Store(tmp_path)
    docs, ids = publish(store, rows)
    loose = dedup.DedupConfig(num_perm=112, bands=56, rows=2)
    m = dedup.run(store, loose, docs=docs)
    assert m.counters["dropped"]["near_duplicate"]["docs"] == 2
    v = dedup.run(store, loose.model_copy(update={"verify_threshold": 0.8}), docs=docs)
    assert v.counters["dropped"]["near_duplicate"]["docs"] == 1
    assert by_name(read_table(v, "dropped"), ids)["copy"]["duplicate_of"] == ids["a"]
    # Pairs checked: a-half (rejected), a-copy (accepted), half-copy (rejected: still another component).
    assert (v.meta["verified_pairs"], v.meta["accepted_pairs"]) == (3, 1)


def test_unspaced_scripts_shingle_by_character(tmp_path):
    """Japanese has no spaces: characters are the words, so an edited copy still shares most 5-grams."""
    rng = random.Random(4)
    chars = "図書館駅近毎週水曜日子向読聞本借二間まであります。はのにをがでと"
    a = "".join(rng.choice(chars) for _ in range(400))
    b = a[:200] + "語" + a[201:]
    c = "".join(rng.choice(chars) for _ in range(400))
    assert len(minhash.normalize(a).split()) > 300
    store = Store(tmp_path)
    docs, ids = publish(store, [("a", a), ("b", b), ("c", c)])
    m = dedup.run(store, dedup.DedupConfig(), docs=docs)
    assert {r: v["docs"] for r, v in m.counters["dropped"].items()} == {"near_duplicate": 1}
    assert by_name(read_table(m, "dropped"), ids)["b"]["duplicate_of"] == ids["a"]


def test_signature_matches_datasketch_and_estimates_jaccard():
    rng = random.Random(5)
    a = words(400, rng)
    b = a[:300] + words(100, rng)
    sa = minhash.shingle_hashes(minhash.normalize(" ".join(a)), 5)
    sb = minhash.shingle_hashes(minhash.normalize(" ".join(b)), 5)
    reference = MinHash(num_perm=112, seed=1, hashfunc=lambda h: int(h) >> 32)
    reference.update_batch(list(sa))
    sig_a, sig_b = minhash.signature(sa, 112, 1), minhash.signature(sb, 112, 1)
    assert np.array_equal(sig_a, reference.hashvalues)
    true = minhash.jaccard(sa, sb)
    assert true == pytest.approx(296 / 500, abs=0.01)
    assert minhash.as_minhash(sig_a, 1).jaccard(minhash.as_minhash(sig_b, 1)) == pytest.approx(true, abs=0.15)


@pytest.mark.parametrize("num_perm, seed", [(112, 1), (128, 0), (7, 2**31)])
def test_permutations_are_datasketchs(num_perm, seed):
    a, b = minhash.permutations(num_perm, seed)
    ref_a, ref_b = MinHash(num_perm=num_perm, seed=seed, scheme=minhash.SCHEME).permutations
    assert a.dtype == ref_a.dtype == np.uint32 and b.dtype == ref_b.dtype
    assert np.array_equal(a, ref_a) and np.array_equal(b, ref_b)
    assert (a % 2 == 1).all()  # odd: each permutation is a bijection of the 32-bit values


def test_normalize_and_short_texts():
    assert minhash.normalize("  Héllo,\tWORLD_2024!\n") == "hello world 0000"
    rng = random.Random(6)
    for _ in range(2000):  # ASCII takes a translate table instead of the regexes: the same result
        text = "".join(chr(rng.randrange(128)) for _ in range(rng.randrange(40)))
        by_regex = " ".join(minhash._PUNCT.sub(" ", minhash._DIGIT.sub("0", text.casefold())).split())
        assert minhash.normalize(text) == by_regex, repr(text)
    short = minhash.shingle_hashes("hello world", 5)
    assert len(short) == 1 and not np.array_equal(short, minhash.shingle_hashes("hello there", 5))
    assert len(minhash.shingle_hashes("", 5)) == 1


def test_bad_config_and_input(tmp_path):
    with pytest.raises(ValueError, match="bands x rows must equal num_perm"):
        dedup.DedupConfig(bands=10, rows=8)
    with pytest.raises(ValueError):
        dedup.DedupConfig(verify_threshold=1.5)
    store = Store(tmp_path)
    with store.writer("extract", "empty") as w:
        pass
    with pytest.raises(StageError, match="no documents"):
        dedup.run(store, dedup.DedupConfig(), docs=w.manifest)
    docs, _ = publish(store, [("a", "some text here")], key="one")
    out = dedup.run(store, dedup.DedupConfig(), docs=docs)
    with pytest.raises(StageError, match="already have"):
        dedup.run(store, dedup.DedupConfig(), docs=out)
