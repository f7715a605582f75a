"""Incremental data refresh: conditional recrawls, dedup against the catalog, new dataset versions.

A generated EN/FR site (tests/e2e/site.py) is served by a real HTTP server that gives
every file a strong ETag and records the validators of every request, so the tests see
exactly what the crawler asked for.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from flows.config import PipelineConfig
from flows.data_refresh import data_refresh
from storage.artifact import Store, read_table
from storage.catalog import Catalog, register_dataset
from storage.documents import SplitConfig, make_doc_id
from storage.tokens import open_split
from tasks import dedup, ingest, shards, tokenizer
from tasks.stage import StageError
from tests.e2e.site import EN, build_site, html, page_text

ROOT = Path(__file__).resolve().parents[2]


class ConditionalHandler(SimpleHTTPRequestHandler):
    """A folder over HTTP with ETags (content hashes); logs (path, If-None-Match, If-Modified-Since, status)."""

    def __init__(self, *args, requests: list, **kwargs):
        self.requests = requests
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            path = os.path.join(path, "index.html")
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        self._etag = '"%s"' % hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if os.path.isfile(path) else None
        if self._etag and inm == self._etag:
            self.requests.append((self.path, inm, ims, 304))
            self.send_response(304)
            self.end_headers()
            return None
        self.requests.append((self.path, inm, ims, 200 if self._etag else 404))
        return super().send_head()  # If-None-Match present: http.server skips its If-Modified-Since check

    def end_headers(self) -> None:
        if getattr(self, "_etag", None):
            self.send_header("ETag", self._etag)
        super().end_headers()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    build_site(root, pages_per_lang=10, near_copies=0)
    requests: list = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(ConditionalHandler, directory=str(root), requests=requests))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()


def page_requests(requests: list) -> list:
    return [r for r in requests if r[0] != "/robots.txt"]


def artifact_dirs(store: Path) -> set[str]:
    return {f"{d.parent.name}/{d.name}" for d in store.glob("*/*") if (d / "manifest.json").exists()}


def config(tmp_path: Path, url: str) -> PipelineConfig:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["store"] = str(tmp_path / "store")
    data["ingest"]["crawl"]["seeds"] = [url]
    data["augment"] = {"enabled": False}
    data["split"] = {"val_fraction": 0.3, "seed": 0}
    return PipelineConfig.model_validate(data)


def change_site(root: Path) -> dict:
    """New pages, copies of old pages, one page rewritten, one lightly edited; returns what is where."""
    rng = random.Random(99)
    new = [f"en/new-{i:03d}.html" for i in range(3)]
    for i, name in enumerate(new):
        (root / name).write_text(html(f"new page {i}", page_text(rng, EN), [], "en"), encoding="utf-8")
    (root / "en/mirror-000.html").write_bytes((root / "en/page-001.html").read_bytes())  # an exact copy
    old = (root / "en/page-004.html").read_text(encoding="utf-8")
    # A near copy (one sentence of twenty changed, Jaccard > 0.8) under a new URL, and the same edit in place.
    edited = old.replace(
        old[old.index("<p>") + 3 : old.index(". ", old.index("<p>"))],
        "The release manager signs the final images on Friday",
        1,
    )
    (root / "en/near-004.html").write_text(edited, encoding="utf-8")
    (root / "en/page-005.html").write_text(
        (root / "en/page-005.html").read_text(encoding="utf-8").replace(*_first_sentence(root / "en/page-005.html")),
        encoding="utf-8",
    )
    (root / "en/page-002.html").write_text(
        html("en page 2", page_text(rng, EN), ["page-001.html", "page-003.html"], "en"), encoding="utf-8"
    )
    index = (root / "index.html").read_text(encoding="utf-8")
    links = "".join(f'<li><a href="{n}">{n}</a></li>' for n in [*new, "en/mirror-000.html", "en/near-004.html"])
    (root / "index.html").write_text(index.replace("</ul>", links + "</ul>", 1), encoding="utf-8")
    return {
        "new": new,
        "rewritten": "en/page-002.html",
        "copies": {"en/mirror-000.html": "en/page-001.html", "en/near-004.html": "en/page-004.html"},
        "edited": "en/page-005.html",
    }


def _first_sentence(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    start = text.index("<p>") + 3
    return text[start : text.index(". ", start)], "The release manager signs the final images on Friday"


@pytest.mark.slow  # whole data-refresh flows through Prefect
def test_incremental_refresh_fetches_only_what_changed_and_adds_only_new_documents(site, tmp_path):
    root, url, requests = site
    cfg = config(tmp_path, url)
    store = Store(cfg.store)

    first = data_refresh(cfg, incremental=True)  # an empty catalog: a full refresh
    assert first["new"] is True
    with Catalog(store.catalog_path, read_only=True) as cat:
        old_docs = {
            r["url"]: r["doc_id"]
            for r in cat.query("SELECT url, doc_id FROM documents WHERE dataset = ?", [first["dataset"]]).to_pylist()
        }
    assert len(old_docs) == 20  # every EN/FR page; the index page is too short to keep
    known_pages = {p for p, *_ in page_requests(requests)}
    dirs = artifact_dirs(store.root)

    # 1. Nothing changed: one conditional request per known page, all 304, nothing published.
    requests.clear()
    unchanged = data_refresh(cfg, incremental=True)
    assert unchanged["new"] is False and unchanged["dataset"] == first["dataset"]
    assert "no new or changed pages since " + first["dataset"] in unchanged["reason"]
    assert artifact_dirs(store.root) == dirs
    seen = page_requests(requests)
    assert {p for p, *_ in seen} == known_pages and len(seen) == len(known_pages)
    assert all(inm and inm.startswith('"') and ims and status == 304 for _, inm, ims, status in seen), seen
    assert unchanged["records"]["ingest"].artifact == ""

    # 2. New pages, copies of old ones, a rewritten page and a lightly edited one.
    changes = change_site(root)
    requests.clear()
    third = data_refresh(cfg, incremental=True)
    assert third["new"] is True and third["dataset"] != first["dataset"]
    rec = third["records"]
    fetched = {p for p, _, _, status in page_requests(requests) if status == 200}
    assert fetched == {
        "/",
        *(f"/{n}" for n in [*changes["new"], *changes["copies"], changes["rewritten"], changes["edited"]]),
    }
    assert rec["ingest"].meta["not_modified"] == len(known_pages) - 3  # all but the index, page-002 and page-005
    assert (rec["ingest"].meta["new"], rec["ingest"].meta["changed"]) == (5, 3)
    dedup = {r: v["docs"] for r, v in rec["dedup"].dropped.items()}
    assert dedup == {"seen_exact": 1, "seen_near": 2}, dedup  # the mirror, the near copy, page-005's small edit
    dropped = {
        r["url"].removeprefix(url): (r["dropped_reason"], r["duplicate_of"])
        for r in read_table(store.load(*rec["dedup"].artifact.split("/")), "dropped").to_pylist()
    }
    assert dropped == {
        "en/mirror-000.html": ("seen_exact", old_docs[url + "en/page-001.html"]),
        "en/near-004.html": ("seen_near", old_docs[url + "en/page-004.html"]),
        changes["edited"]: ("seen_near", old_docs[url + changes["edited"]]),  # a near-duplicate of its own old version
    }
    assert rec["tokenizer"].artifact == first["records"]["tokenizer"].artifact  # reused, not retrained

    with Catalog(store.catalog_path, read_only=True) as cat:
        rows = cat.query("SELECT url, doc_id FROM documents WHERE dataset = ?", [third["dataset"]]).to_pylist()
        lineage = {a["ref"] for a in cat.lineage(third["dataset"])}
    urls = [r["url"] for r in rows]
    assert (
        len(urls) == len(set(urls)) == len({r["doc_id"] for r in rows})
    )  # the rewritten page replaced its old version
    assert set(urls) == set(old_docs) | {url + n for n in changes["new"]}
    assert first["dataset"] in lineage and first["records"]["ingest"].artifact in lineage
    shards = store.load(*third["dataset"].split("/"))
    assert shards.meta["incremental"] == {
        "previous": first["dataset"],
        "new_docs": 4,
        "carried_docs": 19,
        "replaced_docs": 1,
        "linked_shards": 1,
        "rewritten_shards": 1,
    }
    # Pretraining reads whole .bin files: they hold exactly the indexed documents' tokens.
    for split in ("train", "val"):
        n_tokens = sum(s.n_tokens for s in open_split(shards, split))
        assert n_tokens == shards.meta["tokens"][split]


def test_unchanged_files_ingest_publishes_nothing_and_changed_ones_arrive(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.html").write_text(f"<html><body><p>page {i}</p></body></html>")
    store = Store(tmp_path / "store")
    cfg = ingest.IngestConfig(kind="files", files={"root": str(folder)})
    first = ingest.run(store, cfg)
    assert read_table(first, "validators").num_rows == 3
    assert ingest.run(store, cfg.model_copy(update={"snapshot": "2"}), previous=first) is None
    assert len(list((store.root / "ingest").iterdir())) == 1
    (folder / "p1.html").write_text("<html><body><p>page one, rewritten</p></body></html>")
    second = ingest.run(store, cfg.model_copy(update={"snapshot": "3"}), previous=first)
    assert [r["url"] for r in read_table(second).to_pylist()] == [(folder / "p1.html").resolve().as_uri()]
    assert second.parents == [first.ref] and (second.meta["new"], second.meta["changed"]) == (0, 1)
    assert {r["dropped_reason"] for r in read_table(second, "dropped").to_pylist()} == {"unchanged"}
    assert read_table(second, "validators").num_rows == 3  # the unchanged ones carried forward
    assert make_doc_id((folder / "p1.html").resolve().as_uri()) == read_table(second)["doc_id"][0].as_py()
    assert np.array_equal(
        read_table(second, "validators")["url"].to_numpy(zero_copy_only=False),
        read_table(first, "validators")["url"].to_numpy(zero_copy_only=False),
    )


# --- dedup against the documents of earlier runs -------------------------------------------------

VOCAB = sorted(
    {"".join(random.Random(i).choice("abcdefghiklmnoprstuvwy") for _ in range(3 + i % 7)) for i in range(4000)}
)


def _text(rng: random.Random, n: int = 300) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def _edited(ws: list[str], rng: random.Random, positions=(40, 220)) -> str:
    """Two words of 300 replaced: 5-gram Jaccard about 0.94, far above MinHash's cut-off."""
    ws = list(ws)
    for p in positions:
        ws[p] = rng.choice(VOCAB) + "x"
    return " ".join(ws)


def _publish_docs(store: Store, key: str, rows: list[tuple[str, str]]):
    table = pa.table(
        {
            "doc_id": [d for d, _ in rows],
            "url": [f"https://example.org/{d}" for d, _ in rows],
            "source": ["test"] * len(rows),
            "fetched_at": ["2026-11-01"] * len(rows),
            "text": [t for _, t in rows],
        }
    )
    with store.writer("extract", key) as w:
        w.write_table(table)
    return w.manifest


def test_dedup_drops_what_earlier_runs_saw_and_keeps_substantial_changes(tmp_path):
    rng = random.Random(3)
    store = Store(tmp_path)
    old = {f"d{i}": _text(rng) for i in range(8)}
    first = dedup.run(
        store, dedup.DedupConfig(), docs=_publish_docs(store, "old", [(d, " ".join(ws)) for d, ws in old.items()])
    )
    assert read_table(first, "hashes").num_rows == 8 and first.counters["docs_out"] == 8

    n0, n4 = _text(rng), _text(rng)
    new = [
        ("n0", " ".join(n0)),  # new
        ("n1", " ".join(old["d1"]).upper()),  # an exact copy (after normalization) of d1
        ("n1_twin", " ".join(old["d1"])),  # ...and its exact twin in this batch: inherits seen_exact
        ("n2", _edited(old["d2"], rng)),  # a near copy of d2 under a new URL
        ("d3", _edited(old["d3"], rng)),  # d3's page, lightly edited: a near copy of its own old version
        ("d5", " ".join(_text(rng))),  # d5's page rewritten: kept, it replaces the old version downstream
        ("n4", " ".join(n4)),  # new, with a near copy of itself in the batch
        ("n4_a", _edited(n4, rng)),
    ]
    second = dedup.run(store, dedup.DedupConfig(), docs=_publish_docs(store, "new", new), earlier=[first])
    kept = read_table(second)["doc_id"].to_pylist()
    assert kept == ["n0", "d5", "n4"]
    dropped = {r["doc_id"]: (r["dropped_reason"], r["duplicate_of"]) for r in read_table(second, "dropped").to_pylist()}
    assert dropped == {
        "n1": ("seen_exact", "d1"),
        "n1_twin": ("seen_exact", "d1"),
        "n2": ("seen_near", "d2"),
        "d3": ("seen_near", "d3"),
        "n4_a": ("near_duplicate", "n4"),
    }
    assert {r: v["docs"] for r, v in second.counters["dropped"].items()} == {
        "seen_exact": 2,
        "seen_near": 2,
        "near_duplicate": 1,
    }
    assert first.ref in second.parents and second.meta["earlier"] == [first.ref]

    # A third run sees both earlier runs: n0 is now old news, as is d5's rewrite.
    third = dedup.run(
        store,
        dedup.DedupConfig(),
        docs=_publish_docs(store, "third", [("m0", " ".join(n0)), ("d5", new[5][1])]),
        earlier=[first, second],
    )
    assert read_table(third).num_rows == 0
    assert {r["doc_id"]: r["duplicate_of"] for r in read_table(third, "dropped").to_pylist()} == {
        "m0": "n0",
        "d5": "d5",
    }

    with pytest.raises(StageError, match="band keys were made with MinHash"):
        dedup.run(store, dedup.DedupConfig(seed=2), docs=_publish_docs(store, "new", new), earlier=[first])


# --- shards: a new version carries the previous one's tokens over ---------------------------------

SPLIT = SplitConfig(val_fraction=0.25, seed=0)
WORDS = "web text becomes a small model after dedup and filtering le texte du web devient un petit modèle".split()


def _rows(n: int, seed: int, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "doc_id": f"doc{i}",
            "url": f"https://example.org/{i}",
            "source": "test",
            "fetched_at": "2026-11-01",
            "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))),
            "lang": "en",
            "augmented_from": None,
        }
        for i in range(start, start + n)
    ]


def _publish_rows(store: Store, key: str, rows: list[dict]):
    with store.writer("augment", key) as w:
        w.write_table(pa.Table.from_pylist(rows))
    return w.manifest


def test_shards_new_version_links_untouched_shards_and_replaces_changed_documents(tmp_path):
    store = Store(tmp_path)
    cfg = shards.ShardsConfig(max_tokens_per_shard=1024)
    old_rows = _rows(120, seed=0)
    old_docs = _publish_rows(store, "old", old_rows)
    tok = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=600), docs=old_docs, split=SPLIT)
    v1 = shards.run(store, cfg, docs=old_docs, tokenizer=tok, split=SPLIT)

    changed = {**old_rows[5], "text": "a rewritten page about web text " * 5}
    delta = [changed, *_rows(10, seed=1, start=1000)]
    v2 = shards.run(store, cfg, docs=_publish_rows(store, "delta", delta), tokenizer=tok, split=SPLIT, previous=v1)
    for version in (v1, v2):  # what the data-refresh flow does after each shards run
        register_dataset(store, version)

    inc = v2.meta["incremental"]
    assert (inc["previous"], inc["new_docs"], inc["carried_docs"], inc["replaced_docs"]) == (v1.ref, 11, 119, 1)
    assert inc["rewritten_shards"] == 1 and inc["linked_shards"] == len(v1.files_with_prefix("tokens-")) // 2 - 1
    assert v1.ref in v2.parents and tok.ref in v2.parents
    index = read_table(v2, "index").to_pylist()
    assert sorted(r["doc_id"] for r in index) == sorted({r["doc_id"] for r in old_rows} | {r["doc_id"] for r in delta})
    # Every document's tokens, read back through the new index, are its text's encoding + EOT.
    enc = tokenizer.load_tokenizer(tok)
    text = {r["doc_id"]: r["text"] for r in old_rows} | {r["doc_id"]: r["text"] for r in delta}
    shard_files = {s.name: s for split in ("train", "val") for s in open_split(v2, split)}
    for r in index:
        ids = shard_files[r["shard"]].span(r["start"], r["n_tokens"]).tolist()
        assert ids == enc.encode(text[r["doc_id"]], add_special_tokens=False).ids + [int(tok.meta["eot_id"])], r[
            "doc_id"
        ]
    # Untouched shards are the previous version's files (one inode, no copy); pretraining's
    # whole-file reads see exactly the indexed tokens.
    old_inodes = {os.stat(v1.path(f.path)).st_ino for f in v1.files_with_prefix("tokens-")}
    linked = [f for f in v2.files_with_prefix("tokens-") if os.stat(v2.path(f.path)).st_ino in old_inodes]
    assert len(linked) == 2 * inc["linked_shards"]
    for split in ("train", "val"):
        assert sum(s.n_tokens for s in open_split(v2, split)) == sum(
            r["n_tokens"] for r in index if r["split"] == split
        )
    with Catalog(store.catalog_path, read_only=True) as cat:
        assert cat.datasets() == [v1.ref, v2.ref]
        assert cat.query("SELECT count(*) AS n FROM documents WHERE dataset = ?", [v2.ref])["n"][0].as_py() == 130

    other_tok = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=700), docs=old_docs, split=SPLIT)
    with pytest.raises(StageError, match="was not tokenized with"):
        shards.run(store, cfg, docs=_publish_rows(store, "delta", delta), tokenizer=other_tok, split=SPLIT, previous=v1)


@pytest.mark.slow  # whole data-refresh flows through Prefect
def test_a_changed_page_without_text_worth_keeping_is_no_new_version(site, tmp_path):
    root, url, requests = site
    cfg = config(tmp_path, url)
    first = data_refresh(cfg)
    dirs = artifact_dirs(Store(cfg.store).root)
    index = (root / "index.html").read_text(encoding="utf-8")
    (root / "index.html").write_text(
        index.replace("</ul>", '<li><a href="en/page-003.html">again</a></li></ul>', 1), encoding="utf-8"
    )
    again = data_refresh(cfg, incremental=True)
    assert again["new"] is False and again["dataset"] == first["dataset"]
    assert again["reason"].startswith("no text kept from the 1 new or changed pages since")
    assert {d.split("/")[0] for d in artifact_dirs(Store(cfg.store).root) - dirs} == {"ingest", "extract"}
