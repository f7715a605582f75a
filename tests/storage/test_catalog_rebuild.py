"""lmforge catalog rebuild: the catalog recreated from the store alone, whatever happened to the file."""

from flows.cli import main as lmforge
from storage import promotions
from storage.artifact import Store
from storage.catalog import Catalog
from tests.storage.test_catalog import _pipeline, _rows
from tests.storage.test_promotions import _export

QUERIES = {
    "artifacts": "SELECT ref, stage, parents, counters FROM artifacts ORDER BY ref",
    "documents": "SELECT dataset, doc_id, split, shard, start, n_tokens FROM documents ORDER BY dataset, doc_id",
    "token_shards": "SELECT * FROM token_shards ORDER BY dataset, shard",
    "promotions": "SELECT target, seq, action, export, reason FROM promotions ORDER BY target, seq",
}


def contents(store: Store) -> dict:
    with Catalog(store.catalog_path, read_only=True) as cat:
        return {table: cat.query(sql).to_pylist() for table, sql in QUERIES.items()}


def a_store(tmp_path):
    """Two datasets with their lineage, and a deploy target with a promotion and a refusal, as runs leave them."""
    store = Store(tmp_path / "store")
    _pipeline(store, _rows(60, seed=1), "a")
    _pipeline(store, _rows(30, seed=2), "b")
    first, second = _export(store, "e1"), _export(store, "e2")
    promotions.record(store, "demo", "promote", first, "first model")
    promotions.record(store, "demo", "refuse", second, "worse")
    promotions.index_in_catalog(store, "demo")
    return store


def test_a_deleted_or_damaged_catalog_comes_back_the_same(tmp_path, capsys):
    store = a_store(tmp_path)
    before = contents(store)
    assert len(before["documents"]) == 90 and len(before["promotions"]) == 2
    store.catalog_path.unlink()
    assert lmforge(["catalog", "rebuild", "--store", str(store.root)]) == 0
    after = rebuilt = contents(store)
    # the exports were never registered by a run (no lineage registration in this test): the rebuild finds them
    assert {r["ref"] for r in after["artifacts"]} - {r["ref"] for r in before["artifacts"]} == {
        "export/e1",
        "export/e2",
    }
    assert {**after, "artifacts": [r for r in after["artifacts"] if r["stage"] != "export"]} == before
    assert "10 artifacts, 2 datasets (90 documents), 2 deploy decisions of 1 targets" in capsys.readouterr().out

    store.catalog_path.write_bytes(b"not a DuckDB file" * 100)
    assert lmforge(["catalog", "rebuild", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "the old catalog did not open; moved to" in out and "catalog.duckdb.damaged-" in out
    assert contents(store) == rebuilt
    assert len(list(store.root.glob("catalog.duckdb.damaged-*"))) == 1


def test_what_cannot_be_indexed_is_skipped_by_name_and_the_rest_rebuilt(tmp_path, capsys):
    store = a_store(tmp_path)
    broken = store.load("shards", next(p.name for p in sorted((store.root / "shards").iterdir())))
    next(iter(broken.dir.glob("index-*.parquet"))).unlink()
    (store.root / "filter" / "f-zz").mkdir()
    (store.root / "filter" / "f-zz" / "manifest.json").write_text("{not json")
    assert lmforge(["catalog", "rebuild", "--store", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert f"skipped {broken.ref}: index file index-" in out
    assert "skipped filter/f-zz: its manifest does not load" in out
    datasets = {r["dataset"] for r in contents(store)["documents"]}
    assert len(datasets) == 1 and broken.ref not in datasets


def test_a_store_that_is_not_there_is_an_error(tmp_path, capsys):
    assert lmforge(["catalog", "rebuild", "--store", str(tmp_path / "nope")]) == 2
    assert "no store at" in capsys.readouterr().err
