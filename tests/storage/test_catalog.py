"""DuckDB catalog: lineage, document index, SQL subsets back to tokens, clear errors, idempotence."""

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifact import Store
from storage.catalog import Catalog, CatalogBusy, CatalogError, register_dataset, token_spans
from storage.documents import SplitConfig, make_doc_id
from storage.tokens import read_spans
from tasks import shards, tokenizer

SPLIT = SplitConfig(val_fraction=0.25, seed=7)
WORDS = {
    "en": "the catalog indexes every document of the corpus".split(),
    "fr": "le catalogue indexe chaque document du corpus français".split(),
    "de": "der Katalog indiziert jedes Dokument des Korpus über".split(),
}


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang = rng.choice(sorted(WORDS))
        text = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(5, 40)))
        url = f"https://{lang}.example.org/{seed}/{i}"
        rows.append(
            {
                "doc_id": make_doc_id(url, text),
                "url": url,
                "source": "test",
                "fetched_at": "2026-11-01",
                "text": text,
                "lang": lang,
                "lang_score": rng.uniform(0.6, 1.0),
                "signals": {"words": len(text.split())},
                "cluster_id": i,
            }
        )
    return rows


def _pipeline(store, rows, tag):
    """ingest -> filter -> (tokenizer, shards): a lineage three levels deep above shards."""
    with store.writer("ingest", f"i-{tag}") as w:
        w.write_table(pa.table({"url": [r["url"] for r in rows]}))
    ingest = w.manifest
    with store.writer("filter", f"f-{tag}", parents=[ingest]) as w:
        w.write_table(pa.Table.from_pylist(rows))
    docs = w.manifest
    tok = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=700), docs=docs, split=SPLIT)
    data = shards.run(store, shards.ShardsConfig(max_tokens_per_shard=1024), docs=docs, tokenizer=tok, split=SPLIT)
    register_dataset(store, data)  # what the data-refresh flow does after the shards stage
    return ingest, docs, tok, data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store"))
    rows_a, rows_b = _rows(200, seed=1), _rows(60, seed=2)
    return store, rows_a, _pipeline(store, rows_a, "a"), _pipeline(store, rows_b, "b")


def test_sql_subset_gives_token_spans_that_decode_to_the_documents(corpus):
    store, rows, (_, _, tok, ds), _ = corpus
    with Catalog(store.catalog_path, read_only=True) as cat:
        fr = cat.select_documents(ds.ref, "lang = 'fr' AND lang_score > 0.7", split="train")
        everything = cat.select_documents(ds.ref)
    expected = {r["doc_id"]: r["text"] for r in rows if r["lang"] == "fr" and r["lang_score"] > 0.7}
    assert 0 < fr.num_rows < len(expected)  # the split filter took the val docs out
    assert set(fr["split"].to_pylist()) == {"train"} and set(fr["doc_id"].to_pylist()) <= set(expected)
    assert set(fr["dtype"].to_pylist()) == {ds.meta["dtype"]}
    t = tokenizer.load_tokenizer(tok)
    spans = token_spans(fr)
    assert spans == sorted(spans)  # shard order, then offset: sequential reads
    for doc_id, ids in zip(fr["doc_id"].to_pylist(), read_spans(spans, ds.meta["dtype"])):
        assert ids[-1] == ds.meta["eot_id"]
        assert t.decode(ids[:-1].tolist()) == expected[doc_id]
    assert everything.num_rows == len(rows)
    assert set(everything["split"].to_pylist()) == {"train", "val"}


def test_filters_stay_inside_their_dataset(corpus):
    store, rows_a, (*_, ds_a), (*_, ds_b) = corpus
    with Catalog(store.catalog_path, read_only=True) as cat:
        assert cat.select_documents(ds_b.ref, "TRUE").num_rows == 60
        assert cat.query("SELECT count(DISTINCT dataset) AS n FROM documents")["n"][0].as_py() == 2
        shards_per_split = cat.query(
            "SELECT split, count(*) AS n, sum(n_tokens) AS t FROM token_shards WHERE dataset = $1 GROUP BY split ORDER BY split",
            [ds_a.ref],
        ).to_pylist()
    assert [r["split"] for r in shards_per_split] == ["train", "val"]
    assert {r["split"]: r["t"] for r in shards_per_split} == ds_a.meta["tokens"]


SECRET = "/etc/hostname"


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("nope = 1", "names a column, table or function that a filter cannot use"),
        ("lang = ", "syntax error"),
        ("lang = 'fr'; DROP TABLE documents", "not a valid SQL condition"),
        ("lang = 'fr') OR (TRUE", "syntax error"),
        # Reaching past the dataset: files, directory listings, other tables, settings, the environment.
        (f"lang = 'en' AND error((SELECT content FROM read_text('{SECRET}')))::BOOLEAN", "holds a subquery"),
        ("EXISTS (SELECT * FROM glob('/*'))", "holds a subquery"),
        ("doc_id IN (SELECT ref FROM artifacts)", "holds a subquery"),
        ("(SELECT count(*) FROM artifacts WHERE ref LIKE 'shards/%') > 0", "holds a subquery"),
        ("EXISTS (SELECT * FROM duckdb_settings())", "holds a subquery"),
        (f"read_text('{SECRET}') IS NOT NULL", "names a column, table or function"),
        ("length(getenv('HOME')) > 0", "names a column, table or function"),
        ("CAST(lang AS INTEGER) = 1", "fails on the documents"),
    ],
)
def test_a_bad_filter_names_itself_and_the_reason(corpus, bad, reason):
    store, _, (*_, ds), _ = corpus
    with Catalog(store.catalog_path, read_only=True) as cat:
        with pytest.raises(CatalogError, match="documents filter") as err:
            cat.select_documents(ds.ref, bad)
        assert repr(bad) in str(err.value) and reason in str(err.value)
        assert Path(SECRET).read_text().strip() not in str(err.value).replace(repr(bad), "")
        assert cat.select_documents(ds.ref).num_rows == 200


def test_a_filter_sees_its_dataset_only_and_plain_conditions_work(corpus):
    store, _, (*_, ds_a), (*_, ds_b) = corpus
    with Catalog(store.catalog_path, read_only=True) as cat:
        fr = cat.select_documents(
            ds_a.ref, "lang = 'fr' AND n_tokens > 3 AND lang_score IS NOT NULL OR doc_id LIKE 'zz%'"
        )
        assert 0 < fr.num_rows < 200 and set(fr["lang"].to_pylist()) == {"fr"}
        assert fr.column_names[-2:] == ["path", "dtype"]  # token locations come with the rows
        assert cat.select_documents(ds_b.ref, "TRUE").num_rows == 60
        with pytest.raises(CatalogError, match="cannot use"):
            cat.select_documents(ds_a.ref, "dataset IS NOT NULL")  # not even the column naming other datasets


def test_a_catalog_held_by_a_writer_is_busy_not_a_bad_request(tmp_path):
    path = tmp_path / "catalog.duckdb"
    with Catalog(path):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogBusy):
            Catalog(path, read_only=True, lock_timeout=0.5)
    finally:
        holder.kill()
        holder.wait()


def test_lineage_lists_every_ancestor_nearest_first(corpus):
    store, _, (ingest, docs, tok, ds), _ = corpus
    with Catalog(store.catalog_path, read_only=True) as cat:
        lineage = cat.lineage(ds.ref)
        assert [(a["ref"], a["depth"]) for a in lineage] == sorted(
            [(docs.ref, 1), (tok.ref, 1), (ingest.ref, 2)], key=lambda x: (x[1], x[0])
        )
        assert {a["stage"] for a in lineage} == {"ingest", "filter", "tokenizer"}
        assert cat.lineage(ingest.ref) == []
        with pytest.raises(CatalogError, match="not registered"):
            cat.lineage("shards/unknown")


def test_registration_and_indexing_are_idempotent(corpus, tmp_path):
    store, rows, (ingest, docs, tok, ds), _ = corpus
    with Catalog(store.catalog_path) as cat:
        before = cat.query("SELECT ref, counters FROM artifacts ORDER BY ref").to_pylist()
        assert cat.register_lineage(store, ds) == sorted([ingest.ref, docs.ref, tok.ref, ds.ref])
        assert cat.index_documents(ds) == len(rows)
        assert cat.index_documents(ds) == len(rows)
        assert cat.query("SELECT ref, counters FROM artifacts ORDER BY ref").to_pylist() == before
        assert cat.query("SELECT count(*) AS n FROM documents WHERE dataset = ?", [ds.ref])["n"][0].as_py() == len(rows)
        assert cat.query("SELECT count(*) AS n FROM token_shards WHERE dataset = ?", [ds.ref])["n"][0].as_py() == len(
            [f for f in ds.files if f.path.endswith(".bin")]
        )


def test_a_failed_reindex_keeps_the_previous_rows(tmp_path):
    store = Store(tmp_path)
    *_, ds = _pipeline(store, _rows(40, seed=3), "c")
    ds.path("index-00000.parquet").unlink()
    with Catalog(store.catalog_path) as cat:
        with pytest.raises(CatalogError, match=f"cannot index artifact {ds.ref}"):
            cat.index_documents(ds)
        assert cat.select_documents(ds.ref).num_rows == 40


def test_a_missing_ancestor_is_skipped_and_its_ref_kept(tmp_path):
    store = Store(tmp_path)
    with store.writer("ingest", "gone") as w:
        w.write_table(pa.table({"x": [1]}))
    with store.writer("filter", "child", parents=[w.manifest]) as c:
        c.write_table(pa.table({"x": [1]}))
    (tmp_path / "ingest" / "gone" / "manifest.json").unlink()
    with Catalog(store.catalog_path) as cat:
        assert cat.register_lineage(store, c.manifest) == ["filter/child"]
        assert cat.lineage("filter/child") == [
            {"ref": "ingest/gone", "stage": None, "key": None, "depth": 1, "code_version": None, "created_at": None}
        ]


def test_requests_that_cannot_be_answered_say_why(corpus, tmp_path):
    store, _, (ingest, *_), _ = corpus
    with pytest.raises(CatalogError, match="no catalog at"):
        Catalog(tmp_path / "absent.duckdb", read_only=True)
    with Catalog(store.catalog_path, read_only=True) as cat:
        with pytest.raises(CatalogError, match="not indexed"):
            cat.select_documents("shards/unknown", "TRUE")
    with Catalog(tmp_path / "fresh.duckdb") as cat:
        with pytest.raises(CatalogError, match="not a shards artifact"):
            cat.index_documents(ingest)
    with pytest.raises(CatalogError, match="lacks"):
        token_spans(pa.table({"doc_id": ["x"]}))


def test_waits_for_another_process_to_release_the_catalog(tmp_path):
    path = tmp_path / "catalog.duckdb"
    Catalog(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time, duckdb
        con = duckdb.connect({str(path)!r})
        print("holding", flush=True)
        time.sleep(1.5)
        con.close()
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CatalogError, match="cannot open the catalog"):
            Catalog(path, lock_timeout=0.1)
        with Catalog(path, lock_timeout=60) as cat:
            assert cat.query("SELECT count(*) AS n FROM artifacts")["n"][0].as_py() == 0
    finally:
        holder.wait(timeout=60)
