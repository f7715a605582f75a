"""Flow: pretrain the GPT on a dataset version (torchrun child: DDP over nccl or gloo)."""

from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_run, publish_training
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.data_refresh import data_refresh
from flows.records import StageRecord, run_stage
from flows.refs import load_ref, parent_of
from storage.artifact import Store
from tasks import pretrain as pretrain_stage


@flow(name="pretrain", log_prints=True)
def pretrain(
    config: PipelineConfig = DEFAULT_CONFIG,
    dataset: str | None = None,
) -> dict:
    """Pretrain on a dataset version; returns ``{"dataset", "model", "records"}``.

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
        dataset: Shards artifact ref to train on ('shards/<key>'); empty builds it with data-refresh.
    """
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    if not dataset:
        upstream = data_refresh(config)
        dataset, records = upstream["dataset"], dict(upstream["records"])
    data = load_ref(store, dataset, "shards")
    tok = parent_of(store, data, "tokenizer")
    model = run_stage(
        records, "pretrain", pretrain_stage.task, store=store, cfg=config.pretrain, shards=data, tokenizer=tok
    )
    publish_training(model)
    publish_run("pretrain", records)
    return {"dataset": dataset, "model": model.ref, "records": records}
