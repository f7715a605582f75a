"""ingest from local WARC/WET files and folders: records kept, dropped and counted."""

from __future__ import annotations

import gzip
import os
from io import BytesIO
from pathlib import Path

import pytest
from pydantic import ValidationError
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from storage.artifact import Store, read_table
from storage.documents import make_doc_id
from tasks import ingest
from tasks.stage import StageError

HTML = b"<html><body><p>A page about package management.</p></body></html>"


def record(
    url: str,
    body: bytes = HTML,
    status: str = "200 OK",
    ctype: str = "text/html; charset=utf-8",
    kind: str = "response",
) -> bytes:
    """One WARC record, uncompressed, as bytes."""
    out = BytesIO()
    w = WARCWriter(out, gzip=False)
    if kind == "conversion":
        rec = w.create_warc_record(url, "conversion", payload=BytesIO(body), warc_content_type="text/plain")
    elif kind == "request":
        rec = w.create_warc_record(
            url,
            "request",
            http_headers=StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], is_http_request=True),
        )
    else:
        rec = w.create_warc_record(
            url,
            "response",
            payload=BytesIO(body),
            http_headers=StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1"),
        )
    w.write_record(rec)
    return out.getvalue()


def run_warc(tmp_path: Path, *paths: str):
    return ingest.run(Store(tmp_path / "store"), ingest.IngestConfig(kind="warc", warc={"paths": list(paths)}))


def test_warc_records_kept_and_dropped_with_reasons(tmp_path):
    corrupted = record("http://example.org/corrupt").replace(
        b"package management", b"package MANAGEMENT"
    )  # digest no longer matches
    bad_http = record("http://example.org/bad-http").replace(b"HTTP/1.1 200 OK", b"HXXP/9.9 ??? !!")
    data = b"".join(
        [
            record("http://example.org/1"),
            corrupted,
            record("http://example.org/missing", b"gone", status="404 Not Found"),
            record("http://example.org/logo.png", b"\x89PNG", ctype="image/png"),
            record("http://example.org/wet", "Plain text from a WET file. Ça marche.".encode(), kind="conversion"),
            record("http://example.org/1", kind="request"),
            record("http://example.org/1"),
            b"THIS IS NOT A WARC RECORD\r\nat all\r\n\r\n",
            record("http://example.org/8"),
            bad_http,
        ]
    )
    (tmp_path / "in.warc").write_bytes(data)
    m = run_warc(tmp_path, str(tmp_path / "in.warc"))

    kept = read_table(m).to_pylist()
    assert [r["url"] for r in kept] == ["http://example.org/1", "http://example.org/wet", "http://example.org/8"]
    assert kept[0]["doc_id"] == make_doc_id("http://example.org/1")
    assert (kept[0]["http_status"], kept[0]["content_type"], kept[0]["charset"], kept[0]["body"]) == (
        200,
        "text/html",
        "utf-8",
        HTML,
    )
    assert (kept[1]["http_status"], kept[1]["content_type"]) == (None, "text/plain")
    assert kept[1]["body"].decode() == "Plain text from a WET file. Ça marche."
    assert {r["source"] for r in kept} == {"warc"}

    dropped = [(r["url"], r["dropped_reason"]) for r in read_table(m, "dropped").to_pylist()]
    assert dropped[:4] == [
        ("http://example.org/corrupt", "malformed_record"),
        ("http://example.org/missing", "http_404"),
        ("http://example.org/logo.png", "not_html"),
        ("http://example.org/1", "duplicate_url"),
    ]
    assert (
        dropped[4][0].startswith((tmp_path / "in.warc").as_uri() + "#offset=") and dropped[4][1] == "malformed_record"
    )
    assert dropped[5] == ("http://example.org/bad-http", "malformed_record")
    assert m.counters["docs_in"] == 9 and m.counters["docs_out"] == 3
    assert {r: v["docs"] for r, v in m.counters["dropped"].items()} == {
        "malformed_record": 3,
        "http_404": 1,
        "not_html": 1,
        "duplicate_url": 1,
    }


def test_gzipped_warc_resumes_after_a_bad_member_and_a_truncated_tail(tmp_path):
    members = [
        gzip.compress(record("http://example.org/a")),
        gzip.compress(b"garbage that is not WARC\r\n\r\n"),
        gzip.compress(record("http://example.org/b")),
    ]
    tail = gzip.compress(record("http://example.org/c"))
    (tmp_path / "in.warc.gz").write_bytes(b"".join(members) + tail[: len(tail) // 2])
    (tmp_path / "other.warc.gz").write_bytes(gzip.compress(record("http://example.org/d")))
    m = run_warc(tmp_path, str(tmp_path / "*.warc.gz"))
    assert [r["url"] for r in read_table(m).to_pylist()] == [
        "http://example.org/a",
        "http://example.org/b",
        "http://example.org/d",
    ]
    assert m.counters["dropped"] == {"malformed_record": {"docs": 2, "words": 0}}
    assert m.meta["files"] == 2


def test_a_part_per_warc_file_and_more_past_the_part_size(tmp_path):
    """Three WARC files of 1, 2 and 5 pages with parts of at most 3 rows: parts of 1, 2, 3 and 2 rows, in order."""
    for name, n in (("a", 1), ("b", 2), ("c", 5)):
        (tmp_path / f"{name}.warc").write_bytes(b"".join(record(f"http://example.org/{name}{i}") for i in range(n)))
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(tmp_path / "*.warc")]}, part_size={"rows": 3})
    m = ingest.run(Store(tmp_path / "store"), cfg)
    assert [f.rows for f in m.files_with_prefix("part-")] == [1, 2, 3, 2]
    assert [r["url"] for r in read_table(m).to_pylist()][:4] == [
        f"http://example.org/{u}" for u in "a0 b0 b1 c0".split()
    ]
    small = ingest.IngestConfig(kind="warc", warc={"paths": [str(tmp_path / "c.warc")]}, part_size={"mb": 1})
    assert small.part_size.max_bytes == 1 << 20
    with pytest.raises(ValidationError, match="part_size.rows"):
        ingest.IngestConfig(kind="warc", warc={"paths": ["x"]}, part_size={"rows": 0})


def test_missing_or_unmatched_warc_input_names_it(tmp_path):
    with pytest.raises(StageError, match="nope.warc.gz: WARC file not found"):
        run_warc(tmp_path, str(tmp_path / "nope.warc.gz"))
    with pytest.raises(StageError, match="no file matches"):
        run_warc(tmp_path, str(tmp_path / "*.warc"))


def write_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.html").write_bytes(HTML)
    (root / "sub" / "b.HTM").write_bytes(HTML)
    (root / "notes.txt").write_text("plain notes")
    (root / "image.png").write_bytes(b"\x89PNG")


def test_files_kind_reads_the_folder_recursively(tmp_path):
    write_folder(tmp_path / "site")
    m = ingest.run(Store(tmp_path / "store"), ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")}))
    rows = read_table(m).to_pylist()
    root = (tmp_path / "site").resolve()
    assert [(r["url"], r["content_type"]) for r in rows] == [
        ((root / "a.html").as_uri(), "text/html"),
        ((root / "notes.txt").as_uri(), "text/plain"),
        ((root / "sub" / "b.HTM").as_uri(), "text/html"),
    ]
    assert rows[1]["body"] == b"plain notes" and rows[0]["http_status"] is None and rows[0]["source"] == "files"
    assert m.counters["docs_in"] == 3 and m.meta["files"] == 3


def test_changed_local_files_change_the_key_and_unchanged_reuse_it(tmp_path):
    write_folder(tmp_path / "site")
    store = Store(tmp_path / "store")
    cfg = ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")})
    first = ingest.run(store, cfg)
    assert ingest.run(store, cfg).created_at == first.created_at
    before = ingest.local_inputs(cfg)
    page = tmp_path / "site" / "a.html"
    page.write_bytes(HTML + b"<p>more</p>")
    os.utime(page, ns=(page.stat().st_atime_ns, page.stat().st_mtime_ns + 10**9))
    assert ingest.local_inputs(cfg) != before
    second = ingest.run(store, cfg)
    assert second.key != first.key
    assert read_table(second).to_pylist()[0]["body"].endswith(b"<p>more</p>")


def test_empty_result_is_an_error_and_publishes_nothing(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "image.png").write_bytes(b"\x89PNG")
    store = Store(tmp_path / "store")
    with pytest.raises(StageError, match="no page kept out of 0"):
        ingest.run(store, ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")}))
    with pytest.raises(StageError, match="folder not found"):
        ingest.run(store, ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "nowhere")}))
    assert list((store.root / "ingest").iterdir()) == []


def test_an_error_mid_write_leaves_no_artifact(tmp_path, monkeypatch):
    write_folder(tmp_path / "site")

    read_files = ingest.read_files

    def failing(paths, max_bytes):
        yield from list(read_files(paths, max_bytes))[:1]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ingest, "read_files", failing)
    store = Store(tmp_path / "store")
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest.run(store, ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")}))
    assert list((store.root / "ingest").iterdir()) == []


def test_config_needs_the_section_of_its_kind():
    assert ingest.IngestConfig().kind == "crawl"
    with pytest.raises(ValidationError, match="'warc' section is missing"):
        ingest.IngestConfig(kind="warc")
    with pytest.raises(ValidationError):
        ingest.IngestConfig(kind="files", files={"root": "x"}, unknown=1)


def test_files_stay_under_the_root_each_once_and_under_the_size_cap(tmp_path):
    write_folder(tmp_path / "site")
    (tmp_path / "secret.html").write_bytes(HTML)
    (tmp_path / "site" / "escape.html").symlink_to(tmp_path / "secret.html")  # a link out of the root
    (tmp_path / "site" / "again").symlink_to(tmp_path / "site" / "sub", target_is_directory=True)  # b.HTM twice
    (tmp_path / "site" / "big.html").write_bytes(HTML + b"<p>x</p>" * 2000)
    cfg = ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site"), "max_bytes": 4096})
    m = ingest.run(Store(tmp_path / "store"), cfg)
    urls = [r["url"] for r in read_table(m).to_pylist()]
    assert not any("secret" in u or "escape" in u for u in urls)
    assert len(urls) == len(set(urls)) and sum(u.endswith("b.HTM") for u in urls) == 1
    dropped = {r["url"].rsplit("/", 1)[1]: r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
    assert dropped == {"big.html": "too_large"}


@pytest.mark.parametrize("extensions", [[""], ["html"], [".html", "."]])
def test_an_extension_filter_that_matches_anything_is_refused(tmp_path, extensions):
    with pytest.raises(ValueError, match="not a file name ending"):
        ingest.IngestConfig(kind="files", files={"root": str(tmp_path), "extensions": extensions})


def test_a_record_that_lies_about_its_length_or_is_too_large_is_dropped_and_reading_goes_on(tmp_path):
    liar = record("http://example.org/liar").replace(b"Content-Length: ", b"Content-Length: 500000000000\r\nX-Was: ", 1)
    big = record("http://example.org/big", HTML + b"<p>filler</p>" * 1000)
    (tmp_path / "in.warc").write_bytes(record("http://example.org/a") + liar + big + record("http://example.org/b"))
    bomb = gzip.compress(record("http://example.org/bomb", b"<p>" + b"x" * 3_000_000 + b"</p>"))  # 3 MB from a few kB
    (tmp_path / "in2.warc.gz").write_bytes(bomb + gzip.compress(record("http://example.org/c")))
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(tmp_path / "in*")], "max_bytes": 8192})
    m = ingest.run(Store(tmp_path / "store"), cfg)
    kept = [r["url"] for r in read_table(m).to_pylist()]
    assert kept == ["http://example.org/a", "http://example.org/b", "http://example.org/c"]
    dropped = {r["url"]: r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
    assert dropped == {
        "http://example.org/liar": "malformed_record",
        "http://example.org/big": "too_large",
        "http://example.org/bomb": "too_large",
    }
