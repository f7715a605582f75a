"""Flow: evaluate base and finetuned models, export ONNX + INT8, apply the release gate."""

from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_evaluation, publish_export, publish_run
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.finetune import finetune
from flows.records import StageRecord, run_stage
from flows.refs import indexed_dataset, load_ref, parent_of
from storage.artifact import Store
from tasks import evaluate as evaluate_stage
from tasks import export as export_stage


@flow(name="release", log_prints=True)
def release(
    config: PipelineConfig = DEFAULT_CONFIG,
    model: str | None = None,
) -> dict:
    """Evaluate and export; returns ``{"report", "export", "records", ...refs}``; fails when the release gate fails.

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
        model: Finetune artifact ref ('finetune/<key>'); empty builds it with the finetune flow.
    """
    store = Store(config.store)
    records: dict[str, StageRecord] = {}
    if not model:
        upstream = finetune(config)
        model, records = upstream["model"], dict(upstream["records"])
    tuned = load_ref(store, model, "finetune")
    base = parent_of(store, tuned, "pretrain")
    data, tok = indexed_dataset(store, tuned)
    report = run_stage(
        records,
        "evaluate",
        evaluate_stage.task,
        store=store,
        cfg=config.evaluate,
        base=base,
        finetuned=tuned,
        shards=data,
        tokenizer=tok,
    )
    publish_evaluation(report)
    exported = run_stage(
        records, "export", export_stage.task, store=store, cfg=config.export, model=tuned, shards=data, tokenizer=tok
    )
    publish_export(exported)
    publish_run("release", records)
    return {
        "dataset": data.ref,
        "base_model": base.ref,
        "model": tuned.ref,
        "report": report.ref,
        "export": exported.ref,
        "records": records,
    }
