"""Flow: LoRA-finetune a pretrained model on a catalog subset."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.artifacts import publish_run, publish_training
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.pretrain import pretrain
from flows.records import StageRecord, run_stage
from flows.refs import load_ref, parent_of
from storage.artifact import Store
from tasks import finetune as finetune_stage


@flow(name="finetune", log_prints=True)
def finetune(
    config: PipelineConfig = DEFAULT_CONFIG,
    base_model: Annotated[str | None, Field(description="Pretrain artifact ref ('pretrain/<key>'); empty builds it with the pretrain flow.")] = None,
) -> dict:
    """Returns ``{"dataset", "base_model", "model", "records"}``."""
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    if not base_model:
        upstream = pretrain(config)
        base_model, records = upstream["model"], dict(upstream["records"])
    base = load_ref(store, base_model, "pretrain")
    data = parent_of(store, base, "shards")
    tok = parent_of(store, data, "tokenizer")
    tuned = run_stage(records, "finetune", finetune_stage.task, store=store, cfg=config.finetune, base=base, shards=data, tokenizer=tok)
    publish_training(tuned)
    publish_run("finetune", records)
    return {"dataset": data.ref, "base_model": base.ref, "model": tuned.ref, "records": records}
