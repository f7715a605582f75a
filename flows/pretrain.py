"""Flow: pretrain the GPT on a dataset version (torchrun child: DDP over nccl or gloo)."""

from __future__ import annotations

import json

from prefect import flow

from flows.artifacts import publish_run, publish_training
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.data_refresh import data_refresh
from flows.events import MODEL_PRETRAINED, announce
from flows.records import StageRecord, run_stage
from flows.refs import load_ref, parent_of
from storage import promotions
from storage.artifact import Manifest, Store
from tasks import pretrain as pretrain_stage
from tasks.stage import stage_logger


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
    init = promoted_weights(store, config, data, tok) if config.pretrain.continue_from_promoted else None
    model = run_stage(
        records,
        "pretrain",
        pretrain_stage.task,
        store=store,
        cfg=config.pretrain,
        shards=data,
        tokenizer=tok,
        init=init,
    )
    publish_training(model)
    publish_run("pretrain", records)
    announce(MODEL_PRETRAINED, model.ref, model=model.ref, dataset=dataset)
    return {"dataset": dataset, "model": model.ref, "records": records}


def promoted_weights(store: Store, config: PipelineConfig, data: Manifest, tok: Manifest) -> Manifest | None:
    """The promoted model's trained weights (its finetune artifact) when pretraining may continue from
    them: same tokenizer, same shape. Otherwise None, and the log says why training starts from scratch."""
    log = stage_logger("pretrain")  # the run's log inside a flow (lmforge's loggers reach it), plain logging outside
    target = config.deploy_target
    ref = promotions.promoted(store, target)
    export = store.load(*ref.split("/", 1)) if ref else None
    if export is None:
        log.info("pretrain: from scratch: no promoted model for target %r in the store", target)
        return None
    if tok.ref not in export.parents:
        log.info("pretrain: from scratch: the promoted %s has another tokenizer than %s (%s)", ref, data.ref, tok.ref)
        return None
    model = parent_of(store, export, "finetune")
    why = pretrain_stage.shape_mismatch(
        config.pretrain, int(data.meta["vocab_size"]), json.loads(model.path("config.json").read_text())
    )
    if why:
        log.info("pretrain: from scratch: the promoted %s has another shape: %s", ref, why)
        return None
    log.info("pretrain: continuing from the weights of the promoted %s (%s)", ref, model.ref)
    return model
