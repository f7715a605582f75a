"""Flow: web pages to token shards indexed in the catalog (stages 1-7).

A full refresh builds a dataset version from everything the sources hold. An
incremental one (``incremental=True``) extends the catalog's latest dataset version:

- ingest with ``previous`` = that version's newest ingest ancestor, so the crawl sends
  conditional requests and keeps only new or changed pages (:mod:`tasks.ingest`). Its
  ``snapshot`` is the flow run's id, so a Retry of a failed run is all cache hits while
  the next scheduled run fetches again. No new or changed page: nothing is published.
- dedup against every dedup artifact on the version's lineage (exact hashes and MinHash
  band keys), filter and augment the new documents only; no document left: no version.
- the version's own tokenizer (token ids stay stable; no retraining), and shards with
  ``previous``, which carries the old documents over and registers the new version.

With no dataset in the catalog yet, an incremental refresh is a full one. A new version
emits the Prefect event ``lmforge.dataset.published`` (automations start pretraining).
"""

from __future__ import annotations

import datetime as _dt

from prefect import flow, get_run_logger, runtime, task
from prefect.events import emit_event

from flows.artifacts import publish_run
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.records import StageRecord, record_from, run_stage
from flows.refs import ancestors, load_ref, parent_of
from storage.artifact import Manifest, Store
from storage.catalog import Catalog
from tasks import augment, dedup, extract, filter as filter_, ingest, shards, tokenizer

PUBLISHED_EVENT = "lmforge.dataset.published"


def registered_datasets(store: Store) -> list[str]:
    """Dataset versions indexed in the store's catalog, oldest first (none without a catalog)."""
    if not store.catalog_path.exists():
        return []
    with Catalog(store.catalog_path, read_only=True) as cat:
        return cat.datasets()


def run_label() -> str:
    """The id of this run's root flow run (the same across retries of it, and of a parent
    that runs this flow as a subflow), or the time outside a Prefect run."""
    run_id = runtime.flow_run.id and runtime.flow_run.root_flow_run_id
    return str(run_id) if run_id else _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


@task(name="datasets-at-start", cache_key_fn=lambda _ctx, params: f"lmforge-datasets-{params['run']}-{params['root']}",
      persist_result=True)
def datasets_at_start(root: str, run: str) -> list[str]:
    """The catalog's dataset versions when this run first started, kept for its retries.

    A retry must extend the same version as the attempt it repeats: read afresh, the
    catalog could already hold the version that attempt published before it failed, and
    the retry would find "nothing new" and never announce it.
    """
    return registered_datasets(Store(root))


@flow(name="data-refresh", log_prints=True)
def data_refresh(
    config: PipelineConfig = DEFAULT_CONFIG,
    incremental: bool = False,
) -> dict:
    """Crawl or read sources, extract, deduplicate, filter, augment, train the tokenizer, shard.

    Returns ``{"dataset": <shards artifact ref>, "records": {stage: StageRecord}, "new": bool}``;
    ``new`` is False when the run published no new dataset version (``dataset`` is then
    the latest one, and ``"reason"`` says why).

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
        incremental: Extend the catalog's latest dataset version with only new or changed pages
            (conditional requests, dedup against everything already there) instead of rebuilding
            from everything; a full refresh when there is no dataset yet.
    """
    log = get_run_logger()
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    known = datasets_at_start(str(store.root), run_label())
    if incremental and not known:
        log.info("incremental refresh: no dataset in the catalog %s yet, doing a full refresh", store.catalog_path)
    if not (incremental and known):
        raw = run_stage(records, "ingest", ingest.task, store=store, cfg=config.ingest)
        docs = run_stage(records, "extract", extract.task, store=store, cfg=config.extract, raw=raw)
        docs = run_stage(records, "dedup", dedup.task, store=store, cfg=config.dedup, docs=docs)
        docs = run_stage(records, "filter", filter_.task, store=store, cfg=config.filter, docs=docs)
        docs = run_stage(records, "augment", augment.task, store=store, cfg=config.augment, docs=docs, split=config.split)
        tok = run_stage(records, "tokenizer", tokenizer.task, store=store, cfg=config.tokenizer, docs=docs, split=config.split)
        data = run_stage(records, "shards", shards.task, store=store, cfg=config.shards, docs=docs, tokenizer=tok, split=config.split)
        return _published(data, records, new=data.ref not in known, incremental=False)

    previous = load_ref(store, known[-1], "shards")
    lineage = ancestors(store, previous)
    crawls = sorted((m for m in lineage if m.stage == "ingest"), key=lambda m: m.created_at)
    earlier = sorted((m for m in lineage if m.stage == "dedup"), key=lambda m: m.created_at)
    label = run_label() if not config.ingest.snapshot else f"{config.ingest.snapshot}@{run_label()}"
    cfg = config.ingest.model_copy(update={"snapshot": label})
    raw = run_stage(records, "ingest", ingest.task, store=store, cfg=cfg, previous=crawls[-1] if crawls else None)
    if raw is None:
        return _nothing_new(previous, records, "no new or changed pages")
    docs = run_stage(records, "extract", extract.task, store=store, cfg=config.extract, raw=raw, allow_empty=True)
    if not docs.counters.get("docs_out"):
        return _nothing_new(previous, records, f"no text kept from the {docs.counters.get('docs_in', 0)} new or changed pages")
    docs = run_stage(records, "dedup", dedup.task, store=store, cfg=config.dedup, docs=docs, earlier=earlier)
    if not docs.counters.get("docs_out"):
        return _nothing_new(previous, records, f"all {docs.counters.get('docs_in', 0)} new or changed documents duplicate documents already there")
    docs = run_stage(records, "filter", filter_.task, store=store, cfg=config.filter, docs=docs, allow_empty=True)
    if not docs.counters.get("docs_out"):
        return _nothing_new(previous, records, f"none of the {docs.counters.get('docs_in', 0)} new documents passed the filter")
    docs = run_stage(records, "augment", augment.task, store=store, cfg=config.augment, docs=docs, split=config.split)
    tok = parent_of(store, previous, "tokenizer")
    records["tokenizer"] = record_from("tokenizer", tok, "Reused", 0.0)
    data = run_stage(records, "shards", shards.task, store=store, cfg=config.shards, docs=docs, tokenizer=tok, split=config.split,
                     previous=previous)
    return _published(data, records, new=data.ref not in known, incremental=True)


def _nothing_new(previous: Manifest, records: dict[str, StageRecord], why: str) -> dict:
    reason = f"{why} since {previous.ref}; nothing published"
    get_run_logger().info("data-refresh: %s", reason)
    publish_run("data-refresh", records, funnel=True)
    return {"dataset": previous.ref, "records": records, "new": False, "reason": reason}


def _published(data: Manifest, records: dict[str, StageRecord], new: bool, incremental: bool) -> dict:
    """Announce a dataset version this run added to the catalog; the flow's return value."""
    publish_run("data-refresh", records, funnel=True)
    if not new:
        return {"dataset": data.ref, "records": records, "new": False, "reason": f"{data.ref} was already in the catalog"}
    new_docs = int(data.counters.get("docs_out", 0))
    # The deployment label lets an automation react to the nightly refresh only (deployments/prefect.yaml).
    resource = {"prefect.resource.id": f"lmforge.dataset.{data.ref}", "lmforge.deployment": runtime.deployment.name or ""}
    emit_event(event=PUBLISHED_EVENT, resource=resource,
               payload={"dataset": data.ref, "new_docs": new_docs, "incremental": incremental})
    get_run_logger().info("data-refresh: published %s (%d new documents%s)", data.ref, new_docs,
                          f", extending {data.meta['incremental']['previous']}" if incremental else "")
    return {"dataset": data.ref, "records": records, "new": True}
