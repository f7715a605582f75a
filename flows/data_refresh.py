"""Flow: web pages to token shards indexed in the catalog (stages 1-7)."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.records import StageRecord, run_stage
from storage.artifact import Store
from tasks import augment, dedup, extract, filter as filter_, ingest, shards, tokenizer


@flow(name="data-refresh", log_prints=True)
def data_refresh(config: PipelineConfig) -> dict:
    """Crawl or read sources, extract, deduplicate, filter, augment, train the tokenizer, shard.

    Returns ``{"dataset": <shards artifact ref>, "records": {stage: StageRecord}}``.
    """
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    raw = run_stage(records, "ingest", ingest.task, store=store, cfg=config.ingest)
    docs = run_stage(records, "extract", extract.task, store=store, cfg=config.extract, raw=raw)
    docs = run_stage(records, "dedup", dedup.task, store=store, cfg=config.dedup, docs=docs)
    docs = run_stage(records, "filter", filter_.task, store=store, cfg=config.filter, docs=docs)
    docs = run_stage(records, "augment", augment.task, store=store, cfg=config.augment, docs=docs, split=config.split)
    tok = run_stage(records, "tokenizer", tokenizer.task, store=store, cfg=config.tokenizer, docs=docs, split=config.split)
    data = run_stage(records, "shards", shards.task, store=store, cfg=config.shards, docs=docs, tokenizer=tok, split=config.split)
    return {"dataset": data.ref, "records": records}
