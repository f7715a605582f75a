"""Ray nodes that do not share the driver's file system, with an s3:// store (moto's server).

Each node keeps its own copy of the store (its own ``LMFORGE_STORE_CACHE``, as on a host
of its own) and so does the driver: a node cannot open the driver's paths, so every input
part, every file the driver made for a step and every finished part goes through the
bucket (:mod:`tasks.parts.exchange`). The artifacts must still be the local engine's, file
for file, and the bucket must keep nothing of the stage's scratch afterwards.
"""

import random
import shutil

import pytest
from pyarrow.fs import FileSelector, FileType

from storage.artifact import Store, read_table
from tasks import augment, dedup, ingest, shards
from tasks.parts.core import Execution
from tests.ray_cluster import running_ray_cluster
from tests.s3_server import running_s3_server
from tests.tasks import test_augment, test_dedup, test_incremental, test_ingest, test_shards

pytestmark = pytest.mark.slow
URL = "s3://lmforge/stores/team"


@pytest.fixture(scope="module")
def apart(tmp_path_factory):
    """A moto server and a two-node Ray cluster whose nodes keep their copies of the store apart."""
    parts_ray = pytest.importorskip("tasks.parts.ray_cluster")
    root = tmp_path_factory.mktemp("apart")
    with pytest.MonkeyPatch.context() as mp, running_s3_server(mp) as s3:
        mp.setenv("LMFORGE_STORE_CACHE", str(root / "driver"))
        envs = [{"LMFORGE_STORE_CACHE": str(root / f"node{i}")} for i in range(2)]
        with running_ray_cluster(nodes=2, node_env=envs) as nodes:
            yield s3, nodes.address, root
            parts_ray.shutdown()


def _scratch_in_bucket(s3) -> list[str]:
    infos = s3.filesystem().get_file_info(
        FileSelector("lmforge/stores/team/_work", recursive=True, allow_not_found=True)
    )
    return [i.path for i in infos if i.type == FileType.File]


def _copied_to_nodes(root) -> int:
    return sum(1 for i in range(2) for p in (root / f"node{i}").rglob("*.parquet"))


def test_dedup_through_the_bucket_gives_the_local_files(apart, tmp_path):
    s3, address, root = apart
    local_store = Store(tmp_path / "local")
    local = dedup.run(local_store, dedup.DedupConfig(), docs=test_dedup.publish(local_store, test_dedup.corpus())[0])
    store = Store(URL)
    docs, _ = test_dedup.publish(store, test_dedup.corpus())
    on_ray = dedup.run(store, dedup.DedupConfig(), docs=docs, execution=Execution(engine="ray", address=address))
    assert on_ray.key == local.key and on_ray.digest() == local.digest()
    ran = on_ray.meta["execution"]
    # Every part of both per-part steps (sign, then apply with the driver's decisions) and every task of the
    # grouping's maps (the parts' hashes or band keys and the driver's excluded ordinals) went through the bucket.
    assert ran["engine"] == "ray" and ran["group_tasks"] == {"twins": 4, "buckets": 4}  # 2 per worker
    assert ran["parts_through_bucket"] == 2 * ran["parts"] + 8
    assert _copied_to_nodes(root) > 0 and _scratch_in_bucket(s3) == []


def test_a_warc_ingest_and_shards_through_the_bucket_give_the_local_files(apart, tmp_path):
    s3, address, _ = apart
    ray_run = Execution(engine="ray", address=address)
    warcs = test_ingest.many_warcs(tmp_path / "in")  # outside the store: every node reads this path
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(warcs / "*.warc")]})
    local = ingest.run(Store(tmp_path / "local"), cfg, execution=Execution(workers=1))
    on_ray = ingest.run(Store(URL), cfg, execution=ray_run)
    assert on_ray.key == local.key and on_ray.digest() == local.digest()
    # A URL read in an earlier file: the settle step got its removals and read parts from the bucket.
    assert on_ray.counters["dropped"]["duplicate_url"]["docs"] == 3
    assert on_ray.meta["execution"]["parts_through_bucket"] > on_ray.meta["execution"]["parts"]

    rows, shards_cfg = test_shards.make_docs(), shards.ShardsConfig(max_tokens_per_shard=2048)
    local = test_shards.build(Store(tmp_path / "local-shards"), rows, shards_cfg)[2]
    on_ray = test_shards.build(Store(URL), rows, shards_cfg, execution=ray_run)[2]
    assert {f.path: f.sha256 for f in on_ray.files} == {f.path: f.sha256 for f in local.files}
    assert on_ray.meta["execution"]["parts_through_bucket"] == 3 and _scratch_in_bucket(s3) == []


def test_extract_through_the_bucket_holds_the_time_limit(apart, tmp_path):
    """A page past the time limit ends its worker mid-part: the part is retried (its input
    fetched again by a node without it), the page dropped, the artifact the local engine's."""
    from tasks import extract
    from tests.tasks import test_extract as te

    s3, address, _ = apart
    pages = [(f"http://h.org/{i}", te.docbook_page(), "text/html", "utf-8") for i in range(3)]
    pages.insert(1, ("http://h.org/slow", te.nested_page(20_000), "text/html", "utf-8"))
    cfg = extract.ExtractConfig(timeout_seconds=1.0)
    local_store = Store(tmp_path / "local")
    local = extract.run(local_store, cfg, te.raw_artifact(local_store, pages), execution=Execution(workers=1))
    store = Store(URL)
    on_ray = extract.run(store, cfg, te.raw_artifact(store, pages), execution=Execution(engine="ray", address=address))
    assert on_ray.digest() == local.digest()
    assert te.outcome(on_ray)[1] == {"http://h.org/slow": "extract_timeout"}
    ran = on_ray.meta["execution"]
    assert ran["retried_parts"] == ["text part-00000.parquet"] and ran["parts_through_bucket"] == ran["parts"]
    assert _scratch_in_bucket(s3) == []


@pytest.mark.skipif(
    shutil.which("apertium") is None, reason="Debian packages apertium + apertium-eng-spa not installed"
)
def test_augment_through_the_bucket_gives_the_local_files(apart, tmp_path):
    s3, address, _ = apart
    rows, cfg = test_augment.make_docs(36, seed=9), augment.AugmentConfig(fraction=0.5, chrf_min=0.0)
    local_store, store = Store(tmp_path / "local"), Store(URL)
    docs = test_augment.publish(local_store, rows, part_rows=12)
    local = augment.run(local_store, cfg, docs, test_augment.SPLIT)
    docs = test_augment.publish(store, rows, part_rows=12)
    on_ray = augment.run(store, cfg, docs, test_augment.SPLIT, execution=Execution(engine="ray", address=address))
    assert on_ray.digest() == local.digest() and on_ray.counters["augment"]["accepted"] > 0
    # Both passes (rank, then translate with each part's chosen documents) went through the bucket.
    assert on_ray.meta["execution"]["parts_through_bucket"] == 2 * 3 and _scratch_in_bucket(s3) == []


def test_an_incremental_dedup_through_the_bucket_gives_the_local_files(apart, tmp_path):
    """The match with an earlier version's band keys (a published artifact's files, in the bucket) on nodes apart."""
    s3, address, _ = apart
    rng = random.Random(5)
    old = {f"d{i}": test_incremental._text(rng) for i in range(6)}
    new = [
        ("n0", " ".join(test_incremental._text(rng))),  # new
        ("n1", " ".join(old["d1"]).upper()),  # an exact copy of d1
        ("n2", test_incremental._edited(old["d2"], rng)),  # a near copy of d2
    ]

    def twice(store, execution):
        docs = test_incremental._publish_docs(store, "inc-old", [(d, " ".join(ws)) for d, ws in old.items()])
        first = dedup.run(store, dedup.DedupConfig(), docs=docs, execution=execution)
        docs = test_incremental._publish_docs(store, "inc-new", new)
        return dedup.run(store, dedup.DedupConfig(), docs=docs, earlier=[first], execution=execution)

    local = twice(Store(tmp_path / "local"), Execution(workers=1))
    on_ray = twice(Store(URL), Execution(engine="ray", address=address))
    assert on_ray.digest() == local.digest()
    dropped = {r["doc_id"]: (r["dropped_reason"], r["duplicate_of"]) for r in read_table(on_ray, "dropped").to_pylist()}
    assert dropped == {"n1": ("seen_exact", "d1"), "n2": ("seen_near", "d2")}
    ran = on_ray.meta["execution"]
    assert ran["group_tasks"] == {"twins": 4, "seen": 4, "buckets": 4}  # every task through the bucket:
    assert ran["parts_through_bucket"] == 2 * ran["parts"] + 12  # its files, the earlier ones fetched from it
    assert _scratch_in_bucket(s3) == []
