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
from dataclasses import dataclass, field

from prefect import flow, get_run_logger, runtime, task

from flows.artifacts import publish_run
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.events import DATASET_PUBLISHED, announce
from flows.records import StageRecord, record_from, run_stage
from flows.refs import ancestors, load_ref, parent_of
from storage.artifact import Manifest, Store
from storage.catalog import Catalog, register_dataset
from tasks import augment, dedup, extract, ingest, shards, tokenizer
from tasks import filter as filter_


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


@task(
    name="datasets-at-start",
    cache_key_fn=lambda _ctx, params: f"lmforge-datasets-{params['run']}-{params['root']}",
    persist_result=True,
)
def datasets_at_start(root: str, run: str) -> list[str]:
    """The catalog's dataset versions when this run first started, kept for its retries.

    A retry must extend the same version as the attempt it repeats: read afresh, the
    catalog could already hold the version that attempt published before it failed, and
    the retry would find "nothing new" and never announce it.
    """
    return registered_datasets(Store(root))


@dataclass(frozen=True)
class Link:
    """One stage of the data chain: its task, and which earlier stage's output feeds each input.

    ``when_empty`` is what an incremental refresh says when this stage keeps no document
    (``{n}`` is its input count): the run then stops, and publishes no new version.
    """

    stage: str
    task: object
    inputs: dict[str, str] = field(default_factory=dict)
    split: bool = False
    parts: bool = False  # maps over its input's parts: takes the profile's ``execution``
    when_empty: str | None = None


CHAIN = (
    Link("ingest", ingest.task, parts=True),
    Link(
        "extract",
        extract.task,
        {"raw": "ingest"},
        parts=True,
        when_empty="no text kept from the {n} new or changed pages",
    ),
    Link(
        "dedup",
        dedup.task,
        {"docs": "extract"},
        parts=True,
        when_empty="all {n} new or changed documents duplicate documents already there",
    ),
    Link(
        "filter",
        filter_.task,
        {"docs": "dedup"},
        parts=True,
        when_empty="none of the {n} new documents passed the filter",
    ),
    Link("augment", augment.task, {"docs": "filter"}, split=True, parts=True),
    Link("tokenizer", tokenizer.task, {"docs": "augment"}, split=True, parts=True),
    Link("shards", shards.task, {"docs": "augment", "tokenizer": "tokenizer"}, split=True, parts=True),
)
"""The data stages, in order: adding one is one line here."""


@dataclass
class Plan:
    """What differs between a full and an incremental refresh: arguments, not the chain."""

    configs: dict[str, object] = field(default_factory=dict)  # stage -> its config, where not the profile's
    extra: dict[str, dict] = field(default_factory=dict)  # stage -> further arguments
    reuse: dict[str, Manifest] = field(default_factory=dict)  # stage -> artifact taken as is, not run
    previous: Manifest | None = None  # the dataset version an incremental refresh extends


def incremental_plan(store: Store, config: PipelineConfig, previous_ref: str) -> Plan:
    """Extend ``previous_ref``: conditional recrawl, dedup against its lineage, its own tokenizer."""
    previous = load_ref(store, previous_ref, "shards")
    lineage = ancestors(store, previous)
    crawls = sorted((m for m in lineage if m.stage == "ingest"), key=lambda m: m.created_at)
    earlier = sorted((m for m in lineage if m.stage == "dedup"), key=lambda m: m.created_at)
    label = run_label() if not config.ingest.snapshot else f"{config.ingest.snapshot}@{run_label()}"
    return Plan(
        configs={"ingest": config.ingest.model_copy(update={"snapshot": label})},
        extra={
            "ingest": {"previous": crawls[-1] if crawls else None},
            "extract": {"allow_empty": True},
            "dedup": {"earlier": earlier},
            "filter": {"allow_empty": True},
            "shards": {"previous": previous},
        },
        reuse={"tokenizer": parent_of(store, previous, "tokenizer")},
        previous=previous,
    )


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
    plan = incremental_plan(store, config, known[-1]) if incremental and known else Plan()
    out: dict[str, Manifest] = {}
    for link in CHAIN:
        if link.stage in plan.reuse:
            out[link.stage] = plan.reuse[link.stage]
            records[link.stage] = record_from(link.stage, out[link.stage], "Reused", 0.0)
            continue
        args = {name: out[source] for name, source in link.inputs.items()}
        if link.split:
            args["split"] = config.split
        if link.parts:
            args["execution"] = config.execution
        cfg = plan.configs.get(link.stage, getattr(config, link.stage))
        result = run_stage(
            records, link.stage, link.task, store=store, cfg=cfg, **args, **plan.extra.get(link.stage, {})
        )
        if plan.previous is not None:
            if result is None:
                return _nothing_new(plan.previous, records, "no new or changed pages")
            if link.when_empty and not result.counters.get("docs_out"):
                why = link.when_empty.format(n=result.counters.get("docs_in", 0))
                return _nothing_new(plan.previous, records, why)
        out[link.stage] = result
    data = out["shards"]
    register_dataset(store, data)
    return _published(data, records, new=data.ref not in known, incremental=plan.previous is not None)


def _nothing_new(previous: Manifest, records: dict[str, StageRecord], why: str) -> dict:
    reason = f"{why} since {previous.ref}; nothing published"
    get_run_logger().info("data-refresh: %s", reason)
    publish_run("data-refresh", records, funnel=True)
    return {"dataset": previous.ref, "records": records, "new": False, "reason": reason}


def _published(data: Manifest, records: dict[str, StageRecord], new: bool, incremental: bool) -> dict:
    """Announce a dataset version this run added to the catalog; the flow's return value."""
    publish_run("data-refresh", records, funnel=True)
    if not new:
        return {
            "dataset": data.ref,
            "records": records,
            "new": False,
            "reason": f"{data.ref} was already in the catalog",
        }
    new_docs = int(data.counters.get("docs_out", 0))
    # The deployment label lets an automation react to the nightly refresh only (deployments/prefect.yaml).
    announce(DATASET_PUBLISHED, data.ref, dataset=data.ref, new_docs=new_docs, incremental=incremental)
    get_run_logger().info(
        "data-refresh: published %s (%d new documents%s)",
        data.ref,
        new_docs,
        f", extending {data.meta['incremental']['previous']}" if incremental else "",
    )
    return {"dataset": data.ref, "records": records, "new": True}
