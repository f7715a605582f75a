"""The Ray engine: ingest, extract, dedup, filter, augment, the tokenizer's sample and shards on a two-node Ray cluster started here give the local engine's files.

The cluster is real (``ray start`` twice, one CPU per node: see ``tests/ray_cluster.py``);
these tests are slow (about 20 s to start it) and run in ``make test``.
"""

import logging
import shutil

import pytest

from storage.artifact import Store
from tasks import augment, dedup, ingest, shards, tokenizer
from tasks import filter as filter_
from tasks.parts.core import Execution
from tasks.stage import StageError
from tests.ray_cluster import running_ray_cluster
from tests.tasks import test_augment, test_dedup, test_filter, test_ingest, test_shards, test_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    parts_ray = pytest.importorskip("tasks.parts.ray_cluster")
    with running_ray_cluster(nodes=2) as nodes:
        yield nodes.address
        parts_ray.shutdown()


def dedup_on(root, execution, corpus=None):
    store = Store(root)
    docs, _ = test_dedup.publish(store, corpus or test_dedup.corpus())
    return dedup.run(store, dedup.DedupConfig(), docs=docs, execution=execution)


def test_dedup_and_filter_on_ray_publish_the_local_files(cluster, tmp_path):
    local = dedup_on(tmp_path / "local", Execution(workers=1))
    on_ray = dedup_on(tmp_path / "ray", Execution(engine="ray", address=cluster))
    assert on_ray.key == local.key and on_ray.digest() == local.digest()
    ran = on_ray.meta["execution"]
    assert (ran["engine"], ran["workers"], ran["nodes"], ran["retried_parts"]) == ("ray", 2, 2, [])

    texts = test_filter.EN + [test_filter.FR, test_filter.DE, test_filter.ES, test_filter.SPAM_EN]
    cfg = filter_.FilterConfig(languages=["en", "fr", "de"])
    one, two = Store(tmp_path / "f-local"), Store(tmp_path / "f-ray")
    a = filter_.run(one, cfg, docs=test_filter.publish(one, texts), execution=Execution(workers=1))
    b = filter_.run(two, cfg, docs=test_filter.publish(two, texts), execution=Execution(engine="ray", address=cluster))
    assert a.key == b.key and a.digest() == b.digest()
    assert b.counters["docs_out"] == 5 and b.meta["execution"]["engine"] == "ray"


def test_a_killed_ray_worker_costs_its_part_only(cluster, tmp_path, monkeypatch, caplog):
    """SIGKILL the Ray worker holding part 1 before it publishes: Ray reports the crash, the part is redone alone."""
    local = dedup_on(tmp_path / "local", Execution(workers=1))
    marker = tmp_path / "killed"
    monkeypatch.setenv("LMFORGE_KILL_AT", "dedup/sign/1")
    monkeypatch.setenv("LMFORGE_KILL_MARKER", str(marker))
    logging.getLogger("lmforge.dedup").addHandler(caplog.handler)  # Prefect may stop lmforge loggers propagating
    try:
        out = dedup_on(tmp_path / "ray", Execution(engine="ray", address=cluster))
    finally:
        logging.getLogger("lmforge.dedup").removeHandler(caplog.handler)
    assert marker.read_text().startswith("dedup/sign/1 ")
    assert out.digest() == local.digest()
    assert out.meta["execution"]["retried_parts"] == ["sign part-00001.parquet"]
    assert "the worker on part-00001.parquet died (Ray: WorkerCrashedError); retrying that part alone" in caplog.text


def test_a_bad_part_on_ray_names_itself(cluster, tmp_path):
    store = Store(tmp_path)
    with store.writer("extract", "bad") as w:
        for text in ("fine text here", 7):
            w.write_table(
                test_dedup.pa.table(
                    {"doc_id": ["a"], "url": ["u"], "source": ["s"], "fetched_at": ["t"], "text": [text]}
                )
            )
    with pytest.raises(StageError, match=r"\[dedup\] part-00001.parquet \(.*part-00001.parquet\): sign failed: "):
        dedup.run(store, dedup.DedupConfig(), docs=w.manifest, execution=Execution(engine="ray", address=cluster))


def test_an_address_where_no_cluster_answers_fails_fast(tmp_path):
    pytest.importorskip("tasks.parts.ray_cluster")
    with pytest.raises(StageError, match=r"\[dedup\] execution.address '127.0.0.1:1': cannot join the Ray cluster"):
        dedup_on(tmp_path, Execution(engine="ray", address="127.0.0.1:1"))
    with pytest.raises(ValueError, match="without spaces"):
        Execution(engine="ray", address="host:1 --evil")


def test_no_address_starts_ray_on_this_machine(tmp_path, monkeypatch):
    """``address: ''``: Ray starts inside the run (one node, this machine's cores), for trying the engine."""
    parts_ray = pytest.importorskip("tasks.parts.ray_cluster")
    # Not Ray's default token authentication: it writes ~/.ray/auth_token, which every later `ray start`
    # on this machine would pick up (see tests/ray_cluster.py).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        local = dedup_on(tmp_path / "local", Execution(workers=1))
        on_ray = dedup_on(tmp_path / "ray", Execution(engine="ray"))
    finally:
        parts_ray.shutdown()
    assert on_ray.digest() == local.digest()
    assert (on_ray.meta["execution"]["engine"], on_ray.meta["execution"]["nodes"]) == ("ray", 1)


def test_extract_on_ray_holds_the_time_limit_and_publishes_the_local_files(cluster, tmp_path):
    """A page past the time limit ends its Ray worker (the watchdog is a C thread); the part is
    retried, the page dropped as extract_timeout, the other pages kept: the local engine's files."""
    from tasks import extract
    from tests.tasks import test_extract as te

    pages = [(f"http://h.org/{i}", te.docbook_page(), "text/html", "utf-8") for i in range(3)]
    pages.insert(1, ("http://h.org/slow", te.nested_page(20_000), "text/html", "utf-8"))
    cfg = extract.ExtractConfig(timeout_seconds=1.0)
    runs = []
    for where, execution in (("local", Execution(workers=1)), ("ray", Execution(engine="ray", address=cluster))):
        store = Store(tmp_path / where)
        runs.append(extract.run(store, cfg, te.raw_artifact(store, pages), execution=execution))
    local, on_ray = runs
    assert on_ray.digest() == local.digest()
    assert te.outcome(on_ray)[1] == {"http://h.org/slow": "extract_timeout"}
    assert on_ray.meta["execution"]["retried_parts"] == ["text part-00000.parquet"]


def test_ingest_of_warc_files_or_a_folder_on_ray_publishes_the_local_files(cluster, tmp_path):
    warcs = test_ingest.many_warcs(tmp_path / "in")
    cfg = ingest.IngestConfig(kind="warc", warc={"paths": [str(warcs / "*.warc")]})
    local = ingest.run(Store(tmp_path / "local"), cfg, execution=Execution(workers=1))
    on_ray = ingest.run(Store(tmp_path / "ray"), cfg, execution=Execution(engine="ray", address=cluster))
    assert on_ray.key == local.key and on_ray.digest() == local.digest()
    # Which nodes ran these tiny files is Ray's choice (one may finish all four): the engine, not the node count.
    assert on_ray.meta["execution"]["engine"] == "ray" and on_ray.counters["dropped"]["duplicate_url"]["docs"] == 3

    test_ingest.write_folder(tmp_path / "site")
    cfg = ingest.IngestConfig(kind="files", files={"root": str(tmp_path / "site")}, part_size={"rows": 2})
    local = ingest.run(Store(tmp_path / "local"), cfg, execution=Execution(workers=1))
    on_ray = ingest.run(Store(tmp_path / "ray"), cfg, execution=Execution(engine="ray", address=cluster))
    assert on_ray.key == local.key and on_ray.digest() == local.digest()
    assert on_ray.meta["execution"]["parts"] == 2 and [f.rows for f in on_ray.files_with_prefix("part-")] == [2, 1]


def test_shards_on_ray_publish_the_local_bytes(cluster, tmp_path):
    rows, cfg = test_shards.make_docs(), shards.ShardsConfig(max_tokens_per_shard=2048)
    local = test_shards.build(Store(tmp_path / "local"), rows, cfg, execution=Execution(workers=1))[2]
    ray_run = Execution(engine="ray", address=cluster)
    on_ray = test_shards.build(Store(tmp_path / "ray"), rows, cfg, execution=ray_run)[2]
    assert {f.path: f.sha256 for f in on_ray.files} == {f.path: f.sha256 for f in local.files}
    assert (on_ray.meta["execution"]["engine"], on_ray.meta["execution"]["parts"]) == ("ray", 3)


def test_augment_on_ray_publishes_the_local_files(cluster, tmp_path):
    if shutil.which("apertium") is None:
        pytest.skip("Debian packages apertium + apertium-eng-spa not installed")
    rows, cfg = test_augment.make_docs(36, seed=9), augment.AugmentConfig(fraction=0.5, chrf_min=0.0)
    one, two = Store(tmp_path / "local"), Store(tmp_path / "ray")
    split = test_augment.SPLIT
    local = augment.run(one, cfg, test_augment.publish(one, rows, part_rows=12), split, execution=Execution(workers=1))
    docs = test_augment.publish(two, rows, part_rows=12)
    on_ray = augment.run(two, cfg, docs, split, execution=Execution(engine="ray", address=cluster))
    assert on_ray.digest() == local.digest() and on_ray.counters["augment"]["accepted"] > 0
    assert (on_ray.meta["execution"]["engine"], on_ray.meta["execution"]["parts"]) == ("ray", 3)


def test_the_tokenizers_sample_measured_on_ray_gives_the_local_tokenizer(cluster, tmp_path):
    rows, cfg = test_tokenizer.make_docs(), tokenizer.TokenizerConfig(max_train_chars=30_000)
    one, two = Store(tmp_path / "local"), Store(tmp_path / "ray")
    split = test_tokenizer.SPLIT
    local = tokenizer.run(one, cfg, test_tokenizer.publish_docs(one, rows), split, execution=Execution(workers=1))
    ray_run = Execution(engine="ray", address=cluster)
    on_ray = tokenizer.run(two, cfg, test_tokenizer.publish_docs(two, rows), split, execution=ray_run)
    assert on_ray.path("tokenizer.json").read_bytes() == local.path("tokenizer.json").read_bytes()
    assert on_ray.meta["execution"]["engine"] == "ray" and on_ray.counters["train_capped"] is True
