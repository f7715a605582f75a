"""ingest from local WARC/WET files and folders: records kept, dropped and counted."""

from __future__ import annotations

import gzip
import logging
import os
from io import BytesIO
from pathlib import Path

import pytest
from pydantic import ValidationError
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from storage.artifact import Store, read_table
from storage.documents import make_doc_id
from tasks import ingest, inputs
from tasks.parts.core import Execution
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


def test_an_unreadable_warc_file_fails_the_stage_naming_it(tmp_path):
    many_warcs(tmp_path / "in")
    (tmp_path / "in" / "e.warc").mkdir()  # matched by the glob, cannot be read as a file
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(tmp_path / "in" / "*.warc")]})
    store = Store(tmp_path / "store")
    with pytest.raises(StageError, match=r"\[ingest\] e.warc \(.*/in/e.warc\): read failed: .*cannot open WARC file"):
        ingest.run(store, cfg, execution=Execution(workers=2))
    assert list((store.root / "ingest").iterdir()) == []


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

    read_files = inputs.read_files

    def failing(paths, max_bytes):
        yield from list(read_files(paths, max_bytes))[:1]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(inputs, "read_files", failing)  # one part: read in this process
    store = Store(tmp_path / "store")
    with pytest.raises(
        StageError, match=r"\[ingest\] a.html and 2 more \(.*/site\): read failed: RuntimeError: disk on fire"
    ):
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


def test_a_folder_is_read_in_runs_of_files_as_large_as_a_part_the_same_on_one_or_two_workers(tmp_path):
    """Seven files, one too large, parts of at most 3 files: runs of 3, 3 and 1 files, read on
    1 worker or 2 (the second refreshing against the first: only the changed file is kept)."""
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / ("sub" if i % 2 else ".") / f"p{i}.html").write_bytes(HTML.replace(b"package", f"page {i}".encode()))
    (root / "sub" / "z.html").write_bytes(HTML + b"<p>x</p>" * 2000)
    cfg = ingest.IngestConfig(kind="files", files={"root": str(root), "max_bytes": 4096}, part_size={"rows": 3})
    files = ingest.input_files(cfg)
    runs = inputs.folder_parts(files, root.resolve(), cfg.part_size)
    assert [(p.name, p.start, p.rows) for p in runs] == [
        ("p0.html and 2 more", 0, 3),
        ("sub/p1.html and 2 more", 3, 3),
        ("sub/z.html", 6, 1),
    ]
    one = ingest.run(Store(tmp_path / "one"), cfg, execution=Execution(workers=1))
    two = ingest.run(Store(tmp_path / "two"), cfg, execution=Execution(workers=2))
    assert [(f.path, f.sha256, f.rows) for f in two.files] == [(f.path, f.sha256, f.rows) for f in one.files]
    assert [f.rows for f in one.files_with_prefix("part-")] == [3, 3]
    names = [r["url"].rsplit("/", 1)[1] for r in read_table(one).to_pylist()]
    assert names == ["p0.html", "p2.html", "p4.html", "p1.html", "p3.html", "p5.html"]
    assert {r["source"] for r in read_table(one).to_pylist()} == {"files"}
    assert [(r["url"].rsplit("/", 1)[1], r["dropped_reason"]) for r in read_table(one, "dropped").to_pylist()] == [
        ("z.html", "too_large")
    ]
    assert one.meta["files"] == 7 and one.meta["execution"]["parts"] == 3 and two.meta["execution"]["workers"] == 2
    assert one.counters["docs_in"] == 7 and one.counters["docs_out"] == 6

    (root / "sub" / "p3.html").write_bytes(HTML + b"<p>rewritten</p>")
    again = ingest.run(
        Store(tmp_path / "one"), cfg.model_copy(update={"snapshot": "2"}), previous=one, execution=Execution(workers=2)
    )
    assert [r["url"].rsplit("/", 1)[1] for r in read_table(again).to_pylist()] == ["p3.html"]
    unchanged = [r for r in read_table(again, "dropped").to_pylist() if r["dropped_reason"] == "unchanged"]
    assert len(unchanged) == 5 and unchanged[0]["detail"].endswith("p0.html: body identical to the previous ingest's")
    assert (again.meta["new"], again.meta["changed"]) == (0, 1)


@pytest.fixture
def listings(monkeypatch) -> list:
    """The folders listed by ingest, one entry per listing (the real listing still runs)."""
    listed = []
    files_under = ingest.files_under
    monkeypatch.setattr(ingest, "files_under", lambda cfg: listed.append(cfg.root) or files_under(cfg))
    return listed


def test_a_run_lists_its_folder_once_and_the_next_run_again(tmp_path, listings):
    """The key and the parts come from one listing; a later run lists anew (its files may have changed)."""
    write_folder(tmp_path / "site")
    cfg = ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")})
    store = Store(tmp_path / "store")
    first = ingest.run(store, cfg)
    assert len(listings) == 1 and first.counters["docs_out"] == 3
    (tmp_path / "site" / "new.html").write_bytes(HTML)
    second = ingest.run(store, cfg)
    assert len(listings) == 2 and second.key != first.key and second.counters["docs_out"] == 4


def test_a_prefect_task_run_lists_its_folder_once_for_key_lock_and_parts(tmp_path, listings):
    """Prefect's cache key, the builder's lock and the parts share one listing; a cached rerun lists for its key only."""
    from prefect import flow

    from flows.records import run_stage

    write_folder(tmp_path / "site")
    cfg = ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")})
    store = Store(tmp_path / "store")

    @flow
    def ingest_folder():
        records = {}
        run_stage(records, "ingest", ingest.task, store=store, cfg=cfg, execution=Execution(workers=1))
        return records["ingest"]

    first = ingest_folder()
    assert (first.status, first.docs_out, len(listings)) == ("Completed", 3, 1)
    second = ingest_folder()
    assert (second.status, second.artifact, len(listings)) == ("Cached", first.artifact, 2)


def test_listings_waiting_for_their_task_run_are_bounded_in_number_and_age():
    """A cached run never takes its cache key's listing: held listings expire, and only a few are kept."""
    from tasks import prefect_task

    now = [1000.0]
    reads = prefect_task._Reads(keep=2, ttl=300, clock=lambda: now[0])
    for run in ("a", "b", "c"):
        reads.put(run, {"listing": run})
    assert list(reads._by_run) == ["b", "c"]  # the oldest went first
    now[0] += 301
    reads.put("d", {"listing": "d"})
    assert list(reads._by_run) == ["d"]  # b and c expired


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


# --- many WARC files: one step per file, on any number of workers ------------------------------------------


def many_warcs(root: Path) -> Path:
    """Four WARC files; /shared is in a.warc and c.warc (and twice in c.warc), /moved in b.warc and d.warc."""
    root.mkdir(parents=True, exist_ok=True)
    pages = {
        "a": ["a0", "shared", "a1"],
        "b": ["b0", "moved", "b1", "b2"],
        "c": ["shared", "c0", "shared"],
        "d": ["d0", "moved"],
    }
    for name, urls in pages.items():
        body = lambda u: HTML.replace(b"package management", f"{name}: {u}".encode())  # noqa: E731
        (root / f"{name}.warc").write_bytes(b"".join(record(f"http://example.org/{u}", body(u)) for u in urls))
    (root / "b.warc").write_bytes((root / "b.warc").read_bytes() + record("http://example.org/404", status="404 No"))
    return root


def test_warc_files_on_one_or_two_workers_one_killed_give_the_same_artifact(tmp_path, monkeypatch, caplog):
    """The first reading of a URL, in file order, is the one kept: on 1 worker or 2, and when the
    worker reading file 1 is SIGKILLed before it publishes (that file alone is read again)."""
    caplog.set_level(logging.WARNING, logger="lmforge.ingest")
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(many_warcs(tmp_path / "in") / "*.warc")]})
    one = ingest.run(Store(tmp_path / "one"), cfg, execution=Execution(workers=1))
    monkeypatch.setenv("LMFORGE_KILL_AT", "ingest/read/1")
    monkeypatch.setenv("LMFORGE_KILL_MARKER", str(tmp_path / "killed"))
    two = ingest.run(Store(tmp_path / "two"), cfg, execution=Execution(workers=2))
    assert (tmp_path / "killed").exists()
    assert [(f.path, f.sha256, f.rows) for f in two.files] == [(f.path, f.sha256, f.rows) for f in one.files]
    assert two.meta["execution"]["retried_parts"] == ["read b.warc"]
    assert "the worker on b.warc died (exit code -9)" in caplog.text

    kept = [r["url"].rsplit("/", 1)[1] for r in read_table(one).to_pylist()]
    assert kept == ["a0", "shared", "a1", "b0", "moved", "b1", "b2", "c0", "d0"]
    assert [f.rows for f in one.files_with_prefix("part-")] == [3, 4, 1, 1]  # a part per file, c and d less repeats
    assert b"a: shared" in read_table(one).to_pylist()[1]["body"]
    dropped = {
        (r["url"].rsplit("/", 1)[1], r["dropped_reason"], r["detail"]) for r in read_table(one, "dropped").to_pylist()
    }
    assert {(u, why) for u, why, _ in dropped} == {
        ("404", "http_404"),
        ("shared", "duplicate_url"),
        ("moved", "duplicate_url"),
    }
    details = [d for u, why, d in dropped if why == "duplicate_url"]
    assert "c.warc offset 0: URL already read in an earlier file" in details  # a.warc had it
    assert [d for d in details if d.startswith("c.warc") and d.endswith(": URL already read")]  # twice in c.warc
    assert [d for d in details if d.startswith("d.warc offset ") and d.endswith("in an earlier file")]
    assert one.counters["docs_in"] == 13 and one.counters["docs_out"] == 9
    assert one.counters["dropped"]["duplicate_url"]["docs"] == 3
    assert [r["url"].rsplit("/", 1)[1] for r in read_table(one, "validators").to_pylist()] == kept
    assert one.meta["files"] == 4 and (one.meta["new"], one.meta["changed"]) == (9, 0)
    assert not (Store(tmp_path / "two").root / "_work" / "ingest").exists() or not any(
        (Store(tmp_path / "two").root / "_work" / "ingest").rglob("*.parquet")
    )


def test_a_warc_refresh_keeps_only_new_or_changed_pages_whichever_file_they_are_in(tmp_path):
    root = many_warcs(tmp_path / "in")
    store = Store(tmp_path / "store")
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(root / "*.warc")]})
    first = ingest.run(store, cfg, execution=Execution(workers=2))
    assert ingest.run(store, cfg.model_copy(update={"snapshot": "2"}), previous=first) is None

    # a1 changes, e.warc brings a new page and an old one (a0, same body, another file): only a1 and e0 are kept
    body = lambda text: HTML.replace(b"package management", text)  # noqa: E731
    urls = {"a0": b"a: a0", "shared": b"a: shared", "a1": b"a: a1, rewritten"}
    (root / "a.warc").write_bytes(b"".join(record(f"http://example.org/{u}", body(t)) for u, t in urls.items()))
    (root / "e.warc").write_bytes(record("http://example.org/a0", body(b"a: a0")) + record("http://example.org/e0"))
    second = ingest.run(store, cfg.model_copy(update={"snapshot": "3"}), previous=first, execution=Execution(workers=2))
    assert [r["url"] for r in read_table(second).to_pylist()] == ["http://example.org/a1", "http://example.org/e0"]
    assert (second.meta["new"], second.meta["changed"]) == (1, 1)
    reasons = [r["dropped_reason"] for r in read_table(second, "dropped").to_pylist()]
    assert reasons.count("unchanged") == 8 and reasons.count("duplicate_url") == 4  # a0 in e.warc: a repeat
    assert second.counters["docs_out"] == 2 and second.counters["dropped"]["unchanged"]["docs"] == 8
    assert read_table(second, "validators").num_rows == 10  # every URL read, unchanged ones carried forward
