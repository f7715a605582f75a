"""Deploy decisions in an s3:// store (a real S3-compatible server, moto's, started here).

Cache directories stand for machines that share the bucket and nothing else: what one
promotes, another serves and rolls back; two deciding at once never overwrite each other.
"""

import argparse
import json
import multiprocessing

import pytest
from pyarrow.fs import FileSelector, FileType

from flows.cli import _promoted_resolver
from storage import promotions
from storage.artifact import Store
from storage.catalog_rebuild import rebuild_catalog
from storage.object_store import ObjectStore
from tests.s3_server import running_s3_server
from tests.storage.test_promotions import _export

URL = "s3://lmforge/stores/team"


@pytest.fixture
def s3(monkeypatch):
    with running_s3_server(monkeypatch) as server:
        yield server


def test_a_conditional_create_never_replaces_an_object(s3):
    bucket = ObjectStore(URL)
    assert bucket.put_new(b"first", "_deploy/t/ledger/000001.json")
    assert not bucket.put_new(b"second", "_deploy/t/ledger/000001.json")
    assert bucket.read_bytes("_deploy/t/ledger/000001.json") == b"first"
    assert bucket.list_files("_deploy/t/ledger") == ["000001.json"] and bucket.list_dirs("_deploy") == ["t"]


def test_what_one_machine_promotes_another_sees_serves_and_rolls_back(tmp_path, s3, monkeypatch):
    a, b = Store(URL, cache=tmp_path / "a"), Store(URL, cache=tmp_path / "b")
    x, y = _export(a, "x"), _export(a, "y")
    promotions.record(a, "demo", "promote", x, "first")
    assert promotions.targets(b) == ["demo"]
    assert promotions.promoted(b, "demo") == x and promotions.current(b, "demo")["export"] == x

    second = promotions.record(b, "demo", "promote", y, "better")
    assert (second.seq, second.previous) == (2, x)  # b decided on a's decision, read from the bucket
    assert promotions.current(a, "demo")["export"] == y  # the bucket's ledger, not a's own copy
    # a's pointer upload for decision 1 landing after b's: the ledger still says y.
    a.remote.put_bytes(json.dumps({"target": "demo", "seq": 1, "export": x}).encode(), "_deploy/demo/current.json")
    assert promotions.current(a, "demo")["export"] == y and promotions.current(b, "demo")["seq"] == 2
    back = promotions.rollback(a, "demo")
    assert (back.seq, back.export, back.previous) == (3, x, y)
    assert promotions.current(b, "demo")["export"] == x

    objects = {
        i.path.removeprefix("lmforge/stores/team/")
        for i in s3.filesystem().get_file_info(FileSelector("lmforge/stores/team/_deploy", recursive=True))
        if i.type == FileType.File
    }
    assert objects == {"_deploy/demo/current.json"} | {f"_deploy/demo/ledger/00000{n}.json" for n in (1, 2, 3)}

    # A new machine serves the promoted model: found in the bucket, fetched into its own copy.
    monkeypatch.setenv("LMFORGE_STORE_CACHE", str(tmp_path / "c"))
    resolve, target = _promoted_resolver(argparse.Namespace(store=URL, target=None))
    ref, folder = resolve()
    assert (target, ref) == ("demo", x)
    assert folder.is_relative_to(tmp_path / "c") and json.loads((folder / "export.json").read_text()) == {"key": "x"}
    rebuilt = rebuild_catalog(Store(URL, cache=tmp_path / "d"))
    assert (rebuilt.targets, rebuilt.decisions) == (1, 3)


def test_a_machine_that_decided_on_an_old_ledger_is_refused(tmp_path, s3):
    a, b = Store(URL, cache=tmp_path / "a"), Store(URL, cache=tmp_path / "b")
    x = _export(a, "x")
    promotions.record(a, "t", "promote", x, "first")
    stale = []  # what b read before a's decision reached the bucket
    with pytest.raises(promotions.LedgerMoved, match="decision 1 was written by someone else"):
        promotions._append(b, "t", stale, "refuse", x, None, None, "late", {}, {}, "b")
    assert [d.reason for d in promotions.ledger(b, "t")] == ["first"]
    assert promotions.current(b, "t")["export"] == x


def test_a_decision_compared_before_another_machines_is_refused(tmp_path, s3):
    """b reads the ledger and compares with x; meanwhile a promotes y: b's decision, made
    against x, must not be written after a's (the deploy flow then compares again with y)."""
    a, b = Store(URL, cache=tmp_path / "a"), Store(URL, cache=tmp_path / "b")
    x, y, z = _export(a, "x"), _export(a, "y"), _export(a, "z")
    promotions.record(a, "t", "promote", x, "first")
    seen, compared_with = promotions.state(b, "t")
    assert (seen, compared_with) == (1, x)
    promotions.record(a, "t", "promote", y, "meanwhile")
    with pytest.raises(promotions.LedgerMoved, match="decisions 2..2 were made elsewhere while this one was compared"):
        promotions.record(b, "t", "promote", z, "better than x", after=seen)
    assert promotions.state(b, "t") == (2, y)
    again = promotions.record(b, "t", "refuse", z, "worse than y", after=2)
    assert (again.seq, again.previous, promotions.current(a, "t")["export"]) == (3, y, y)


def _decide(url: str, cache: str, ref: str, n: int, out) -> None:
    store, taken = Store(url, cache=cache), 0
    for _ in range(n):
        try:
            promotions.record(store, "t", "promote", ref, f"from {cache}")
            taken += 1
        except promotions.PromotionError:
            pass  # another machine took the number first: "deploy again"
    out.put(taken)


def test_machines_deciding_at_once_lose_no_decision_and_overwrite_none(tmp_path, s3):
    a = Store(URL, cache=tmp_path / "a")
    refs = [_export(a, "x"), _export(a, "y")]
    ctx = multiprocessing.get_context("spawn")  # the AWS_* environment of the test server goes with them
    out = ctx.Queue()
    procs = [ctx.Process(target=_decide, args=(URL, str(tmp_path / m), r, 8, out)) for m, r in zip("bc", refs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    taken = out.get(timeout=5) + out.get(timeout=5)
    decisions = promotions.ledger(Store(URL, cache=tmp_path / "d"), "t")
    assert [d.seq for d in decisions] == list(range(1, taken + 1))  # every accepted decision, none overwritten
    assert taken >= 8  # each refusal means the other machine took that number
    for before, after in zip(decisions, decisions[1:]):
        assert after.previous == before.serving  # each decided on the one before it
