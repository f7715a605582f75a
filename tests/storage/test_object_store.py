"""A store on object storage (s3://) against a real S3-compatible server (moto's, started here).

Two cache directories stand for two machines: what one publishes, the other finds in the
bucket, byte for byte, and a damaged or missing object is named, never half-fetched.
"""

import time

import pyarrow as pa
import pytest
from pyarrow.fs import FileSelector, FileType

from flows.cli import main as lmforge
from flows.config import PipelineConfig
from storage.artifact import MANIFEST, ArtifactError, Store, read_table
from storage.catalog import Catalog
from storage.catalog_rebuild import rebuild_catalog
from storage.gc import collect
from storage.object_store import ObjectStoreError
from tests.s3_server import running_s3_server
from tests.storage.test_catalog import _pipeline, _rows

URL = "s3://lmforge/stores/team"


@pytest.fixture
def s3(monkeypatch):
    with running_s3_server(monkeypatch) as server:
        yield server


def _publish(store, key="k1", n=50):
    with store.writer("dedup", key, config={"n": n}) as w:
        w.write_table(pa.table({"doc_id": [f"d{i}" for i in range(n)], "text": ["word " * i for i in range(n)]}))
        (w.dir / "notes.txt").write_text("made on machine A")
        w.counters["docs_out"] = n
    return w.manifest


def test_what_one_machine_publishes_another_fetches_byte_for_byte(tmp_path, s3):
    a, b = Store(URL, cache=tmp_path / "a"), Store(URL, cache=tmp_path / "b")
    made = _publish(a)
    listed = s3.filesystem().get_file_info(FileSelector("lmforge", recursive=True))
    objects = {i.path for i in listed if i.type == FileType.File}
    assert objects == {f"lmforge/stores/team/dedup/k1/{f}" for f in ("part-00000.parquet", "notes.txt", MANIFEST)}

    assert b.is_published("dedup", "k1") and not (b.root / "dedup" / "k1").exists()  # asked, not fetched
    assert b.refs() == [("dedup", "k1")]
    got = b.load("dedup", "k1")
    assert got.digest() == made.digest() and got.dir == tmp_path / "b" / "dedup" / "k1"
    b.verify(got)
    assert read_table(got).equals(read_table(made))
    assert got.path("notes.txt").read_text() == "made on machine A"
    assert b.load("dedup", "other") is None


def test_a_damaged_object_is_named_and_nothing_half_fetched_is_kept(tmp_path, s3):
    _publish(Store(URL, cache=tmp_path / "a"))
    with s3.filesystem().open_output_stream("lmforge/stores/team/dedup/k1/part-00000.parquet") as f:
        f.write(b"not the parquet file that was published")
    b = Store(URL, cache=tmp_path / "b")
    with pytest.raises(
        ArtifactError, match=r"dedup/k1 in s3://lmforge/stores/team: file part-00000.parquet does not match"
    ):
        b.load("dedup", "k1")
    assert not (b.root / "dedup" / "k1").exists()
    assert not list((b.root / "dedup").glob(".tmp-*"))


def test_an_upload_that_did_not_finish_is_done_by_the_next_reader(tmp_path, s3):
    """A killed upload leaves files without a manifest: the bucket does not have the artifact
    until the machine that has it loads it again."""
    made = _publish(Store(URL, cache=tmp_path / "a"))
    s3.filesystem().delete_file(f"lmforge/stores/team/dedup/k1/{MANIFEST}")
    assert Store(URL, cache=tmp_path / "b").load("dedup", "k1") is None
    assert Store(URL, cache=tmp_path / "a").load("dedup", "k1").digest() == made.digest()  # uploads it
    assert Store(URL, cache=tmp_path / "c").load("dedup", "k1").digest() == made.digest()


def test_a_new_machine_rebuilds_the_catalog_from_the_bucket(tmp_path, s3):
    a = Store(URL, cache=tmp_path / "a")
    _pipeline(a, _rows(40, seed=3), "x")
    b = Store(URL, cache=tmp_path / "b")
    done = rebuild_catalog(b)
    assert not done.skipped and done.datasets == 1 and done.documents == 40
    sql = "SELECT dataset, doc_id, split, shard, start, n_tokens FROM documents ORDER BY doc_id"
    with Catalog(a.catalog_path, read_only=True) as ca, Catalog(b.catalog_path, read_only=True) as cb:
        assert cb.query(sql).to_pylist() == ca.query(sql).to_pylist()


def test_an_unreachable_store_or_a_bad_url_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = Store(URL, cache=tmp_path / "a")
    started = time.monotonic()
    with pytest.raises(
        ObjectStoreError, match=r"object store s3://lmforge/stores/team: cannot look up dedup/k1/manifest.json"
    ):
        store.load("dedup", "k1")
    assert time.monotonic() - started < 60
    for bad, why in [("s3://Bad_Bucket/x", "is not a bucket name"), ("s3://lmforge/../etc", "is not a plain name")]:
        with pytest.raises(ValueError, match=why):
            PipelineConfig(store=bad)


def test_gc_deletes_the_bucket_scratch_of_published_keys_only(tmp_path, s3, monkeypatch, capsys):
    """Parts that a killed driver left in the bucket's _work go once their key is published;
    a key not published may be a stage running on another machine: it stays."""
    a = Store(URL, cache=tmp_path / "a")
    _publish(a)
    bucket = a.remote
    bucket.put_bytes(b"x" * 1000, "_work/dedup/k1/sign/00000/bands.parquet")  # k1 is published
    bucket.put_bytes(b"y" * 10, "_work/dedup/k2/sign/00000/bands.parquet")
    dry = collect(Store(URL, cache=tmp_path / "b"), dry_run=True)  # a machine with no copy of the store
    assert dry.removed == [(f"{URL}/_work/dedup/k1", 1000)]
    monkeypatch.setenv("LMFORGE_STORE_CACHE", str(tmp_path / "c"))
    assert lmforge(["gc", "--store", URL]) == 0
    assert f"freed 0.0 MB in 1 item(s) under {URL}" in capsys.readouterr().out
    assert bucket.list_tree("_work") == ["dedup/k2/sign/00000/bands.parquet"]
    assert Store(URL, cache=tmp_path / "d").load("dedup", "k1") is not None
