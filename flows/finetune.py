"""Flow: LoRA-finetune a pretrained model on a catalog subset."""

from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_run, publish_training
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.events import MODEL_FINETUNED, announce
from flows.pretrain import pretrain
from flows.records import StageRecord, run_stage
from flows.refs import indexed_dataset, load_ref
from storage.artifact import Store
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
    data, tok = indexed_dataset(store, base)
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
    announce(MODEL_FINETUNED, tuned.ref, model=tuned.ref, base_model=base.ref)
    return {"dataset": data.ref, "base_model": base.ref, "model": tuned.ref, "records": records}
