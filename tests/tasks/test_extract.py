"""extract: main content out, boilerplate and bad pages dropped with reasons, time limit held."""

from __future__ import annotations

import hashlib
import logging
import random
import time

import pyarrow as pa
import pytest

from storage.artifact import ArtifactWriter, Store, read_table
from storage.documents import count_words, make_doc_id
from tasks import extract
from tasks.ingest import RAW_SCHEMA
from tasks.parts.core import Execution
from tasks.stage import StageError
from tasks.text import html
from tasks.text.extract_parts import CRASH_SWITCH
from tasks.text.html import ExtractConfig, decode_body

PARAS = [
    "APT is a vast project, whose original plans included a graphical interface. It is based on a library which "
    "contains the core application, and apt-get is the first front end, which was developed within the project.",
    "Both tools are built on top of the same library and are thus very close, but the default behavior of apt has "
    "been improved for interactive use and to actually do what most users expect from a package manager.",
    "For any work with APT, the list of available packages needs to be updated; this can be done simply through "
    "apt update. Depending on the speed of your connection this operation can take a while.",
]
FRENCH = "Le café coûte 3 €. Déjà vu, naïve façade, « guillemets » et cætera : l'œuvre complète. " * 4


def docbook_page(paras: list[str] = PARAS) -> bytes:
    """A page shaped like the Debian handbook's DocBook HTML: banner, nav above and below."""
    nav = (
        '<ul class="docnav{top}"><li class="previous"><a accesskey="p" href="apt.html"><strong>Prev</strong>Chapter 6. Maintenance</a></li>'
        '<li class="up"><a accesskey="u" href="#"><strong>Up</strong></a></li><li class="home"><a accesskey="h" href="index.html">'
        '<strong>Home</strong></a></li><li class="next"><a accesskey="n" href="next.html"><strong>Next</strong>6.3. The apt-cache Command</a></li></ul>'
    )
    body = "".join(f'<div class="para">{p}</div>' for p in paras)
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?><!DOCTYPE html><html xmlns="http://www.w3.org/1999/xhtml"><head>'
        '<meta http-equiv="Content-Type" content="text/html; charset=UTF-8" /><title>6.2. Commands</title></head><body>'
        '<div id="banner"><a href="http://debian-handbook.info/get/"><span class="text">Download the ebook</span></a></div>'
        '<p id="title"><a class="left" href="http://www.debian.org"><img alt="Product Site" src="left.png" /></a></p>'
        + nav.format(top=" top")
        + f'<div class="section"><div class="titlepage"><h2 class="title">6.2. aptitude, apt-get, and apt Commands</h2></div>{body}</div>'
        + nav.format(top="")
        + "</body></html>"
    ).encode("utf-8")


def html_of(text: str, head: str = "") -> str:
    return f"<html><head>{head}</head><body><article><p>{text}</p></article></body></html>"


def raw_artifact(store: Store, pages: list[tuple[str, bytes, str, str | None]]):
    """An ingest-shaped artifact of (url, body, content_type, charset) rows."""
    rows = [
        {
            "doc_id": make_doc_id(url),
            "url": url,
            "source": "crawl",
            "fetched_at": "2026-11-23T00:00:00+00:00",
            "http_status": 200,
            "content_type": ctype,
            "charset": charset,
            "body": body,
        }
        for url, body, ctype, charset in pages
    ]
    key = hashlib.sha256(repr(pages).encode()).hexdigest()[:24]
    with store.writer("ingest", key) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    return w.manifest


def outcome(m) -> tuple[dict, dict]:
    kept = {r["url"]: r["text"] for r in read_table(m).to_pylist()}
    dropped = {r["url"]: r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
    return kept, dropped


def test_main_content_is_kept_and_navigation_removed(tmp_path):
    store = Store(tmp_path)
    raw = raw_artifact(store, [("http://h.org/apt.html", docbook_page(), "text/html", "utf-8")])
    m = extract.run(store, ExtractConfig(), raw)
    text = read_table(m).to_pylist()[0]["text"]
    assert text.startswith("6.2. aptitude, apt-get, and apt Commands")
    for p in PARAS:
        assert p in text
    for boilerplate in ("Download the ebook", "Product Site", "Prev", "Next", "Home", "6.3. The apt-cache Command"):
        assert boilerplate not in text
    assert read_table(m).column_names == ["doc_id", "url", "source", "fetched_at", "text"]
    assert read_table(m).to_pylist()[0]["doc_id"] == make_doc_id("http://h.org/apt.html")


def test_every_page_is_kept_or_dropped_with_its_reason(tmp_path):
    store = Store(tmp_path)
    french = html_of(FRENCH).encode("cp1252")
    pages = [
        ("http://h.org/latin1-header", french, "text/html", "iso-8859-1"),
        (
            "http://h.org/cp1252-meta",
            html_of(FRENCH, '<meta charset="windows-1252">').encode("cp1252"),
            "text/html",
            None,
        ),
        ("http://h.org/wrong-header", french, "text/html", "utf-8"),
        ("http://h.org/bogus-header", html_of(FRENCH).encode("utf-8"), "text/html", "no-such-charset"),
        ("http://h.org/notes.txt", ("Plain notes.\r\n" + " ".join(PARAS)).encode("utf-8"), "text/plain", None),
        ("http://h.org/random", random.Random(0).randbytes(5000), "text/html", None),
        ("http://h.org/nulls", b"\x00" * 300 + html_of(" ".join(PARAS)).encode(), "text/html", "utf-8"),
        ("http://h.org/short", html_of("Hello there.").encode(), "text/html", "utf-8"),
        ("http://h.org/empty", b"<html><body><script>var x = 1;</script></body></html>", "text/html", "utf-8"),
    ]
    m = extract.run(store, ExtractConfig(), raw_artifact(store, pages), execution=Execution(workers=2))
    kept, dropped = outcome(m)
    assert list(kept) == [
        "http://h.org/latin1-header",
        "http://h.org/cp1252-meta",
        "http://h.org/wrong-header",
        "http://h.org/bogus-header",
        "http://h.org/notes.txt",
    ]
    for url in list(kept)[:4]:
        assert kept[url] == FRENCH.strip()
    assert kept["http://h.org/notes.txt"].startswith("Plain notes.\nAPT is a vast project")
    assert dropped == {
        "http://h.org/random": "undecodable",
        "http://h.org/nulls": "undecodable",
        "http://h.org/short": "too_short",
        "http://h.org/empty": "empty_text",
    }
    c = m.counters
    assert (c["docs_in"], c["docs_out"]) == (9, 5)
    assert c["words_out"] == sum(count_words(t) for t in kept.values())
    assert c["dropped"]["too_short"] == {"docs": 1, "words": 2}
    assert c["words_in"] == c["words_out"] + 2
    short = next(r for r in read_table(m, "dropped").to_pylist() if r["url"] == "http://h.org/short")
    assert short["text"] == "Hello there." and "min_chars=200" in short["detail"]


def test_decode_body_order():
    assert decode_body(b"\xef\xbb\xbfcaf\xc3\xa9", "windows-1252", 0.01) == "café"  # a BOM beats the header
    assert decode_body("café".encode("cp1252"), "latin1", 0.01) == "café"
    assert decode_body(b"caf\xc3\xa9 \xff ok" + b" plain ascii text" * 10, None, 0.01).startswith("caf")
    with pytest.raises(html.Undecodable):
        decode_body(b"\x00\x01\x02\x03 binary", None, 0.01)


def nested_page(depth: int) -> bytes:
    """Unclosed nested tags: resiliparse's time grows with the square of the depth (8,000: seconds)."""
    return html_of("<div><p>word " * depth).encode()


def test_time_limit_and_crashes_cost_one_document_each(tmp_path, monkeypatch, caplog):
    """A page past the time limit (real: resiliparse on 20,000 nested tags takes minutes) and a
    page that crashes its worker are dropped; the part's other pages are kept, in order."""
    caplog.set_level(logging.WARNING, logger="lmforge.extract")
    monkeypatch.setenv(CRASH_SWITCH, "CRASH")  # the part workers take LMFORGE_* switches with every job
    store = Store(tmp_path)
    good = [(f"http://h.org/{i}", docbook_page(), "text/html", "utf-8") for i in range(6)]
    pages = (
        good[:2]
        + [("http://h.org/slow", nested_page(20_000), "text/html", "utf-8")]
        + good[2:4]
        + [("http://h.org/crash", docbook_page(PARAS + ["CRASH"]), "text/html", "utf-8")]
        + good[4:]
    )
    started = time.monotonic()
    m = extract.run(store, ExtractConfig(timeout_seconds=1.0), raw_artifact(store, pages))
    assert time.monotonic() - started < 60
    kept, dropped = outcome(m)
    assert list(kept) == [u for u, *_ in good]
    assert dropped == {"http://h.org/slow": "extract_timeout", "http://h.org/crash": "extract_error"}
    details = {r["url"]: r["detail"] for r in read_table(m, "dropped").to_pylist()}
    assert details["http://h.org/slow"] == "no result within 1s"
    assert details["http://h.org/crash"] == "the extraction process died on this page twice"
    # the timeout costs one death of the part's worker, the crash two; each one logged
    assert m.meta["execution"]["retried_parts"] == ["text part-00000.parquet"] * 3
    assert m.meta["dropped_unread"] == 2
    assert "the worker on part-00000.parquet died (exit code 3)" in caplog.text


def test_rerun_returns_the_same_artifact(tmp_path):
    store = Store(tmp_path)
    raw = raw_artifact(store, [("http://h.org/a", docbook_page(), "text/html", "utf-8")])
    first = extract.run(store, ExtractConfig(), raw)
    again = extract.run(store, ExtractConfig(), raw)
    assert (again.key, again.created_at, again.files) == (first.key, first.created_at, first.files)
    assert extract.run(store, ExtractConfig(min_chars=10), raw).key != first.key


def test_parts_close_at_the_configured_rows_or_size(tmp_path):
    """Five kept pages: parts of 2 rows give 2 + 2 + 1; a 1 MiB ceiling on 600 KB texts gives a part per 2 pages."""
    store = Store(tmp_path)
    pages = [(f"http://h.org/{i}", docbook_page(), "text/html", "utf-8") for i in range(5)]
    m = extract.run(store, ExtractConfig(part_size={"rows": 2}), raw_artifact(store, pages))
    assert [f.rows for f in m.files_with_prefix("part-")] == [2, 2, 1]
    big = html_of(" ".join(["word"] * 120_000)).encode()  # 600,000 characters of text
    pages = [(f"http://h.org/big{i}", big, "text/html", "utf-8") for i in range(5)]
    m = extract.run(store, ExtractConfig(part_size={"mb": 1}), raw_artifact(store, pages))
    assert [f.rows for f in m.files_with_prefix("part-")] == [2, 2, 1]


def test_failures_publish_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)
    raw = raw_artifact(
        store,
        [
            ("http://h.org/a", docbook_page(), "text/html", "utf-8"),
            ("http://h.org/b", html_of("tiny").encode(), "text/html", "utf-8"),
        ],
    )
    with pytest.raises(StageError, match=r"no text kept out of 2 pages \(too_short: 2\)"):
        extract.run(store, ExtractConfig(min_chars=100_000), raw)

    added = ArtifactWriter.add_file

    def failing(self, *args, **kwargs):
        if self.stage == "extract":
            raise OSError("disk full")
        return added(self, *args, **kwargs)

    monkeypatch.setattr(ArtifactWriter, "add_file", failing)
    with pytest.raises(OSError, match="disk full"):
        extract.run(store, ExtractConfig(), raw)
    assert list((store.root / "extract").iterdir()) == []


def test_runaway_texts_are_dropped_in_every_language(tmp_path):
    """A megabyte page or a 10-kilobyte 'word' (base64, a minified blob) never reaches the filter or BPE;
    a long URL or a paragraph of a script written without spaces is not such a word."""
    store = Store(tmp_path)
    blob = "QUJD" * 3000  # 12,000 characters without a space
    pages = [
        ("http://h.org/ok", docbook_page(PARAS + ["http://h.org/" + "%2527" * 300]), "text/html", "utf-8"),
        ("http://h.org/ja-ok", html_of("日本語の文章です。" * 400).encode(), "text/html", "utf-8"),
        ("http://h.org/huge", html_of("Une phrase tout à fait ordinaire. " * 40_000).encode(), "text/html", "utf-8"),
        ("http://h.org/blob", docbook_page(PARAS + [blob]), "text/html", "utf-8"),
        ("http://h.org/ja", html_of("日本語の文章です。" * 100 + blob).encode(), "text/html", "utf-8"),
    ]
    m = extract.run(store, ExtractConfig(), raw_artifact(store, pages))
    kept, dropped = outcome(m)
    assert list(kept) == ["http://h.org/ok", "http://h.org/ja-ok"]
    assert dropped == {
        "http://h.org/huge": "too_long",
        "http://h.org/blob": "word_too_long",
        "http://h.org/ja": "word_too_long",
    }


def test_parts_give_the_same_files_on_one_worker_or_two_with_one_killed(tmp_path, monkeypatch, caplog):
    """Three ingest parts: output files numbered in input order, byte for byte the same on one
    worker and on two, one of which is SIGKILLed with part 1 done but not published."""
    caplog.set_level(logging.WARNING, logger="lmforge.extract")
    pages = [(f"http://h.org/{i}", docbook_page(PARAS[i % 3 :]), "text/html", "utf-8") for i in range(7)]
    pages.insert(3, ("http://h.org/short", html_of("Hello there.").encode(), "text/html", "utf-8"))

    def run(where: str, execution: Execution):
        store = Store(tmp_path / where)
        rows = raw_artifact(store, pages)
        with store.writer("ingest", "three-parts") as w:
            for chunk in (slice(0, 3), slice(3, 6), slice(6, None)):
                w.write_table(read_table(rows).slice(chunk.start, (chunk.stop or 8) - chunk.start))
        return extract.run(store, ExtractConfig(part_size={"rows": 2}), w.manifest, execution=execution)

    one = run("one", Execution(workers=1))
    monkeypatch.setenv("LMFORGE_KILL_AT", "extract/text/1")
    monkeypatch.setenv("LMFORGE_KILL_MARKER", str(tmp_path / "killed"))
    two = run("two", Execution(workers=2))
    assert [(f.path, f.sha256, f.rows) for f in two.files] == [(f.path, f.sha256, f.rows) for f in one.files]
    assert [f.rows for f in one.files_with_prefix("part-")] == [2, 1, 2, 2]  # 3, 2 and 2 kept
    assert [r["url"] for r in read_table(one).to_pylist()] == [u for u, *_ in pages if u != "http://h.org/short"]
    assert two.meta["execution"]["retried_parts"] == ["text part-00001.parquet"]
    assert "the worker on part-00001.parquet died (exit code -9)" in caplog.text
