"""Artifacts: atomic publish, crash safety, checksums, and one artifact per key."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifact import MANIFEST, ArtifactError, Store, artifact_key, iter_batches, read_table


def _table(n, start=0):
    return pa.table(
        {"doc_id": [f"d{i}" for i in range(start, start + n)], "text": [f"text {i}" for i in range(start, start + n)]}
    )


def _tmp_dirs(store, stage):
    return sorted(p.name for p in (store.root / stage).glob(".tmp-*"))


def test_publish_writes_manifest_with_checksums_and_rows(tmp_path):
    store = Store(tmp_path)
    with store.writer("dedup", "k1", config={"a": 1}, code_version="v1") as w:
        w.write_table(_table(3))
        w.write_table(_table(2, 3))
        w.write_table(_table(1, 9), "dropped")
        (w.dir / "notes.txt").write_text("hello")
        w.counters["docs_out"] = 5
        w.meta["vocab_size"] = 7
        assert store.load("dedup", "k1") is None  # nothing visible before the rename
    m = w.manifest
    assert m.dir == tmp_path / "dedup" / "k1"
    assert sorted(f.path for f in m.files) == [
        "dropped-00000.parquet",
        "notes.txt",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert {f.path: f.rows for f in m.files}["part-00001.parquet"] == 2
    loaded = store.load("dedup", "k1")
    assert loaded.digest() == m.digest() and loaded.counters == {"docs_out": 5} and loaded.meta == {"vocab_size": 7}
    assert "root" not in json.loads((m.dir / MANIFEST).read_text())
    store.verify(loaded)
    assert read_table(loaded)["doc_id"].to_pylist() == ["d0", "d1", "d2", "d3", "d4"]
    assert read_table(loaded, "dropped").num_rows == 1
    assert sum(b.num_rows for b in iter_batches(loaded, batch_size=2)) == 5
    assert _tmp_dirs(store, "dedup") == []


def test_an_exception_inside_the_writer_publishes_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("dedup", "k1") as w:
            w.write_table(_table(3))
            raise RuntimeError("boom")
    assert store.load("dedup", "k1") is None
    assert not (tmp_path / "dedup" / "k1").exists()
    assert _tmp_dirs(store, "dedup") == []


def test_a_killed_writer_leaves_only_a_tmp_dir_that_the_next_writer_sweeps(tmp_path):
    crash = textwrap.dedent(f"""
        import os, pyarrow as pa
        from storage.artifact import Store
        with Store({str(tmp_path)!r}).writer("dedup", "k1") as w:
            w.write_table(pa.table({{"x": [1, 2, 3]}}))
            os._exit(9)  # killed mid-write: no cleanup runs
    """)
    proc = subprocess.run([sys.executable, "-c", crash], cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 9
    store = Store(tmp_path)
    assert len(_tmp_dirs(store, "dedup")) == 1
    assert store.load("dedup", "k1") is None

    with store.writer("dedup", "k1") as w:
        w.write_table(_table(2))
    assert _tmp_dirs(store, "dedup") == []
    assert read_table(store.load("dedup", "k1")).num_rows == 2


def test_verify_names_a_corrupted_or_missing_file(tmp_path):
    store = Store(tmp_path)
    with store.writer("dedup", "k1") as w:
        w.write_table(_table(50))
        (w.dir / "tokens-train-00000.bin").write_bytes(bytes(range(200)))
    m = w.manifest
    store.verify(m)

    path = m.path("tokens-train-00000.bin")
    data = bytearray(path.read_bytes())
    data[17] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tokens-train-00000.bin does not match its checksum"):
        store.verify(m)

    path.write_bytes(bytes(range(200)))
    store.verify(m)
    m.path("part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00000.parquet is missing"):
        store.verify(m)


def test_same_key_published_twice_keeps_the_first(tmp_path):
    store = Store(tmp_path)
    with store.writer("dedup", "k1") as first:
        first.write_table(_table(3))
    with store.writer("dedup", "k1") as second:  # e.g. a rerun that did not check the store first
        second.write_table(_table(3, 100))
    assert second.manifest.digest() == first.manifest.digest()
    assert read_table(store.load("dedup", "k1"))["doc_id"].to_pylist() == ["d0", "d1", "d2"]
    assert [p.name for p in (tmp_path / "dedup").iterdir()] == ["k1"]


def test_two_writers_of_one_key_in_flight_at_once_both_succeed(tmp_path):
    store = Store(tmp_path)
    first, second = store.writer("dedup", "k1"), store.writer("dedup", "k1")
    with first:
        first.write_table(_table(3))
        with second:  # two workers racing on one key
            second.write_table(_table(3))
    assert first.manifest.digest() == second.manifest.digest()


def test_key_depends_on_parents_config_and_code(tmp_path):
    store = Store(tmp_path)
    with store.writer("ingest", "p1") as w:
        w.write_table(_table(1))
    parent = w.manifest
    base = artifact_key("dedup", [parent], {"n": 5}, "v1")
    assert base == artifact_key("dedup", [parent], {"n": 5}, "v1")
    assert base != artifact_key("dedup", [parent], {"n": 6}, "v1")
    assert base != artifact_key("dedup", [parent], {"n": 5}, "v2")
    assert base != artifact_key("dedup", [], {"n": 5}, "v1")
    moved = Store(tmp_path / "elsewhere").root
    relocated = store.load("ingest", "p1")
    relocated.root = str(moved)
    assert artifact_key("dedup", [relocated], {"n": 5}, "v1") == base  # digest ignores where the store lives


def test_part_buffer_bounds_parts_by_rows_and_bytes(tmp_path):
    from storage.artifact import PartBuffer

    store = Store(tmp_path)
    with store.writer("ingest", "parts") as w:
        by_rows = PartBuffer(w, "part", max_rows=4)
        for i in range(10):
            by_rows.add({"doc_id": f"d{i}", "body": b"x"})
        by_rows.flush()
        by_bytes = PartBuffer(w, "big", max_rows=100, max_bytes=10, size_of=lambda r: len(r["body"]))
        for i in range(5):
            by_bytes.add({"doc_id": f"b{i}", "body": b"123456"})
        by_bytes.flush()
        tables = PartBuffer(w, "index", max_rows=3)
        tables.add_table(pa.table({"n": list(range(5))}))
        tables.add_table(pa.table({"n": list(range(5, 8))}))
        tables.flush()
    m = w.manifest
    assert [f.rows for f in m.files_with_prefix("part-")] == [4, 4, 2]
    assert [f.rows for f in m.files_with_prefix("big-")] == [2, 2, 1]  # 12 bytes >= 10 closes a part
    assert [f.rows for f in m.files_with_prefix("index-")] == [3, 3, 2]
    assert read_table(m, "index")["n"].to_pylist() == list(range(8))


def test_refs_and_manifest_paths_stay_inside_the_store(tmp_path):
    store = Store(tmp_path / "store")
    outside = tmp_path / "outside"
    with Store(outside).writer("x", "evil") as w:
        w.write_table(_table(1))
    for stage, key in [("shards", "../../outside/x/evil"), ("..", "x"), ("shards", ".."), ("shards", "a/b"), ("", "k")]:
        with pytest.raises(ArtifactError, match="is not a plain name"):
            store.load(stage, key)
    with store.writer("dedup", "k1") as w:
        w.write_table(_table(2))
    manifest = json.loads((w.manifest.dir / "manifest.json").read_text())
    for bad in ["/etc/hostname", "../k2/part-00000.parquet", "a/../../b"]:
        tampered = {**manifest, "files": [{**manifest["files"][0], "path": bad}]}
        (w.manifest.dir / "manifest.json").write_text(json.dumps(tampered))
        with pytest.raises(ArtifactError, match="is not a relative path inside the artifact"):
            store.load("dedup", "k1")


def test_a_rebuilt_artifact_with_the_same_content_has_the_same_digest(tmp_path):
    """The digest is content (files' checksums), not when it was made: what was built from it stays valid."""
    store = Store(tmp_path)
    with store.writer("dedup", "k1") as w:
        w.write_table(_table(3))
        w.meta["seconds"] = 1.0
    first = w.manifest
    shutil.rmtree(first.dir)
    with store.writer("dedup", "k1") as w:
        w.write_table(_table(3))
        w.meta["seconds"] = 2.0  # timings differ from run to run
    assert w.manifest.created_at != first.created_at
    assert w.manifest.digest() == first.digest()
    with store.writer("dedup", "k2") as other:
        other.write_table(_table(4))
    assert other.manifest.digest() != first.digest()


def test_the_loser_of_a_publish_race_adopts_the_winners_artifact(tmp_path, monkeypatch):
    """Both writers saw no artifact; the first rename wins and the second keeps the winner's, no error."""
    import storage.atomic as atomic

    store = Store(tmp_path)
    real_exists = Path.exists
    with store.writer("dedup", "k1") as w:
        w.write_table(_table(3))
    winner = w.manifest
    calls = {"n": 0}

    def stale_exists(path):  # the loser checked before the winner renamed
        if path == winner.dir and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_exists(path)

    monkeypatch.setattr(atomic.Path, "exists", stale_exists)
    with store.writer("dedup", "k1") as loser:
        loser.write_table(_table(3))
    assert loser.manifest.created_at == winner.created_at and calls["n"] == 1
    assert [p.name for p in (tmp_path / "dedup").iterdir()] == ["k1"]


def test_a_ref_that_climbs_out_of_the_store_is_a_stage_error(tmp_path):
    from flows.refs import load_ref
    from tasks.stage import StageError

    with pytest.raises(StageError, match=r"\[shards\] shards/\.\./\.\./x: .*is not a plain name"):
        load_ref(Store(tmp_path), "shards/../../x", "shards")
