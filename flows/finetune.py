"""Flow: LoRA-finetune a pretrained model on a catalog subset."""

from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_run, publish_training
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.pretrain import pretrain
from flows.records import StageRecord, run_stage
from flows.refs import load_ref, parent_of
from storage.artifact import Store
from storage.catalog import register_dataset
from tasks import finetune as finetune_stage


@flow(name="finetune", log_prints=True)
def finetune(
    config: PipelineConfig = DEFAULT_CONFIG,
    base_model: str | None = None,
) -> dict:
    """LoRA-finetune a pretrained model; returns ``{"dataset", "base_model", "model", "records"}``.

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
        base_model: Pretrain artifact ref ('pretrain/<key>'); empty builds it with the pretrain flow.
    """
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    if not base_model:
        upstream = pretrain(config)
        base_model, records = upstream["model"], dict(upstream["records"])
    base = load_ref(store, base_model, "pretrain")
    data = parent_of(store, base, "shards")
    tok = parent_of(store, data, "tokenizer")
    register_dataset(store, data)  # the stages select documents in the catalog: rebuild it if it was lost
    tuned = run_stage(
        records,
        "finetune",
        finetune_stage.task,
        store=store,
        cfg=config.finetune,
        base=base,
        shards=data,
        tokenizer=tok,
    )
    publish_training(tuned)
    publish_run("finetune", records)
    return {"dataset": data.ref, "base_model": base.ref, "model": tuned.ref, "records": records}
