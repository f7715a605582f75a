"""The deploy ledger: promotions, refusals and rollbacks replay to what is serving; the catalog mirrors it."""

import json
import multiprocessing

import pytest

from storage import promotions
from storage.artifact import Store
from storage.catalog import Catalog


def _export(store: Store, key: str) -> str:
    with store.writer("export", key) as w:
        (w.dir / "export.json").write_text(json.dumps({"key": key}))
    return w.manifest.ref


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "store")


def test_promotions_refusals_and_rollbacks_replay_to_what_is_serving(store):
    a, b, c = (_export(store, k) for k in "abc")
    assert promotions.promoted(store, "demo") is None and promotions.current(store, "demo") is None
    first = promotions.record(store, "demo", "promote", a, "first", metrics={"candidate_bits_per_byte": 2.5})
    assert (first.seq, first.previous, first.serving) == (1, None, a)
    refused = promotions.record(store, "demo", "refuse", b, "worse")
    assert (refused.previous, refused.serving) == (a, a) and promotions.promoted(store, "demo") == a
    promotions.record(store, "demo", "promote", c, "better")
    assert promotions.promoted(store, "demo") == c
    assert promotions.current(store, "demo")["export"] == c
    back = promotions.rollback(store, "demo", run="test")
    assert (back.action, back.export, back.previous, back.serving) == ("rollback", a, c, a)
    assert promotions.promoted(store, "demo") == a and promotions.current(store, "demo")["export"] == a
    with pytest.raises(promotions.PromotionError, match="nothing to roll back to"):
        promotions.rollback(store, "demo")
    assert [d.action for d in promotions.ledger(store, "demo")] == ["promote", "refuse", "promote", "rollback"]
    assert promotions.promoted(store, "other") is None  # targets are apart


def test_a_rollback_to_a_model_no_longer_in_the_store_is_refused(store):
    a, b = _export(store, "a"), _export(store, "b")
    promotions.record(store, "t", "promote", a, "first")
    promotions.record(store, "t", "promote", b, "second")
    (store.root / a / "manifest.json").unlink()
    with pytest.raises(promotions.PromotionError, match="no longer in the store"):
        promotions.rollback(store, "t")
    assert promotions.promoted(store, "t") == b


@pytest.mark.parametrize("target", ["", "../x", ".hidden", "a/b", "x" * 65, "sp ace"])
def test_a_target_must_be_a_plain_name(store, target):
    with pytest.raises(promotions.PromotionError, match="not a valid name"):
        promotions.record(store, target, "promote", "export/a", "x")


def test_a_ledger_entry_is_never_overwritten(store):
    a = _export(store, "a")
    promotions.record(store, "t", "promote", a, "first")
    stale = promotions.ledger(store, "t")[:0]  # a writer that read the ledger before the first entry
    with pytest.raises(promotions.PromotionError, match="written by someone else"):
        promotions._append(store, "t", stale, "refuse", a, None, None, "late", {}, {}, "x")
    assert [d.reason for d in promotions.ledger(store, "t")] == ["first"]


def _promote_under_lock(root: str, ref: str, n: int) -> None:
    store = Store(root)
    for _ in range(n):
        with promotions.decision_lock(store, "t"):
            promotions.record(store, "t", "promote", ref, "concurrent")


def test_concurrent_deciders_take_turns(store):
    a, b = _export(store, "a"), _export(store, "b")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_promote_under_lock, args=(str(store.root), ref, 5)) for ref in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [d.seq for d in promotions.ledger(store, "t")] == list(range(1, 11))


def test_the_catalog_mirrors_the_ledger(store):
    a, b = _export(store, "a"), _export(store, "b")
    promotions.record(store, "t", "promote", a, "first", lineage={"model": "finetune/m", "dataset": "shards/d"})
    promotions.record(store, "t", "refuse", b, "worse", metrics={"candidate_bits_per_byte": 3.0})
    assert promotions.index_in_catalog(store, "t") == 2
    assert promotions.index_in_catalog(store, "t") == 2  # idempotent
    with Catalog(store.catalog_path, read_only=True) as cat:
        rows = cat.query("SELECT seq, action, export, serving, model, dataset FROM promotions ORDER BY seq").to_pylist()
        bpb = cat.query("SELECT metrics->>'candidate_bits_per_byte' AS v FROM promotions WHERE seq = 2").to_pylist()
    assert rows == [
        {"seq": 1, "action": "promote", "export": a, "serving": a, "model": "finetune/m", "dataset": "shards/d"},
        {"seq": 2, "action": "refuse", "export": b, "serving": a, "model": None, "dataset": None},
    ]
    assert bpb == [{"v": "3.0"}]
