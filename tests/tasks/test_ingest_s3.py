"""ingest of WARC files from a bucket (s3:// globs) on a real S3-compatible server started here."""

from __future__ import annotations

import pytest

from storage.artifact import Store, read_table
from tasks import ingest
from tasks.stage import StageError
from tests.s3_server import running_s3_server
from tests.tasks.test_ingest import record

CRAWL = "s3://crawl/CC-MAIN-2026-49/warc"


@pytest.fixture
def s3(monkeypatch):
    with running_s3_server(monkeypatch, buckets=("crawl",)) as server:
        yield server


def _put(s3, key: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(f"crawl/{key}") as f:
        f.write(data)


def _warcs(tmp_path, s3) -> dict[str, bytes]:
    """The same three WARC files (1, 2 and 5 pages) in the bucket and on disk, plus objects no glob here should take."""
    files = {
        name: b"".join(record(f"http://example.org/{name}{i}") for i in range(n))
        for name, n in (("a", 1), ("b", 2), ("c", 5))
    }
    (tmp_path / "local").mkdir()
    for name, data in files.items():
        _put(s3, f"CC-MAIN-2026-49/warc/{name}.warc", data)
        (tmp_path / "local" / f"{name}.warc").write_bytes(data)
    _put(s3, "CC-MAIN-2026-49/warc/sub/d.warc", record("http://example.org/d0"))
    _put(s3, "CC-MAIN-2026-49/wet/a.warc", record("http://example.org/wet"))
    return files


def _run(store, *paths, **changes):
    return ingest.run(store, ingest.IngestConfig(kind="warc", warc={"paths": list(paths)}, **changes))


def test_warcs_from_a_bucket_give_what_the_same_files_on_disk_give(tmp_path, s3):
    _warcs(tmp_path, s3)
    store = Store(tmp_path / "store")
    remote = _run(store, f"{CRAWL}/*.warc", part_size={"rows": 3})
    local = _run(store, str(tmp_path / "local" / "*.warc"), part_size={"rows": 3})
    assert [f.rows for f in remote.files_with_prefix("part-")] == [1, 2, 3, 2]  # a part per file, as on disk
    assert read_table(remote).equals(read_table(local))
    assert remote.meta["files"] == 3
    # Nothing downloaded is left behind; '**' reaches into sub-folders; local and remote mix, in order.
    assert not [p for p in (store.root / "_work" / "ingest").rglob("*") if p.is_file()]
    deep = _run(store, str(tmp_path / "local" / "a.warc"), f"{CRAWL}/**.warc")
    urls = [r["url"] for r in read_table(deep).to_pylist()]
    assert urls[0] == "http://example.org/a0" and "http://example.org/d0" in urls
    assert deep.counters["dropped"]["duplicate_url"]["docs"] == 1  # a.warc twice: its page once


def test_a_changed_object_changes_the_key_and_an_unchanged_bucket_reuses_it(tmp_path, s3):
    files = _warcs(tmp_path, s3)
    store = Store(tmp_path / "store")
    first = _run(store, f"{CRAWL}/*.warc")
    assert _run(store, f"{CRAWL}/*.warc").key == first.key
    _put(s3, "CC-MAIN-2026-49/warc/b.warc", files["b"] + record("http://example.org/b9"))
    again = _run(store, f"{CRAWL}/*.warc")
    assert again.key != first.key and again.counters["docs_out"] == first.counters["docs_out"] + 1


def test_a_bucket_pattern_that_names_nothing_or_is_not_a_url_is_named(tmp_path, s3):
    store = Store(tmp_path / "store")
    with pytest.raises(StageError, match=r"s3://crawl/nothing/\*\.warc: no object matches this pattern"):
        _run(store, "s3://crawl/nothing/*.warc")
    with pytest.raises(StageError, match=r"is not s3://bucket/key"):
        _run(store, "s3://crawl")
    with pytest.raises(StageError, match=r"s3://nobucket/\*\.warc: object store s3://nobucket: no such bucket"):
        _run(store, "s3://nobucket/*.warc")
