"""Flow: evaluate base and finetuned models, export ONNX + INT8, apply the release gate.

It ends with the candidate beside the model promoted for the profile's deploy target
(the compare stage, ``release-vs-promoted`` in the UI); deploying it is the deploy flow's
decision.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.artifacts import publish_comparison, publish_evaluation, publish_export, publish_harness, publish_run
from flows.comparison import compare_with_promoted
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.events import RELEASE_EXPORTED, announce
from flows.finetune import finetune
from flows.records import StageRecord, run_stage
from flows.refs import indexed_dataset, load_ref, parent_of
from storage.artifact import Store
from tasks import evaluate as evaluate_stage
from tasks import export as export_stage
from tasks import harness as harness_stage
from tasks.stage import StageError


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
    harness = None
    if config.harness.tasks:
        harness = run_stage(
            records,
            "harness",
            harness_stage.task,
            store=store,
            cfg=config.harness,
            export=exported,
            shards=data,
            tokenizer=tok,
        )
        publish_harness(harness)
    try:
        comparison, _ = compare_with_promoted(records, store, config, exported)
        publish_comparison(comparison)
    except StageError as e:  # the promoted model is gone: the release stands, the deploy flow will say so
        get_run_logger().warning("release: no comparison with the promoted model: %s", e)
    publish_run("release", records)
    announce(RELEASE_EXPORTED, exported.ref, export=exported.ref, model=tuned.ref)
    return {
        "dataset": data.ref,
        "base_model": base.ref,
        "model": tuned.ref,
        "report": report.ref,
        "export": exported.ref,
        "harness": harness.ref if harness is not None else None,
        "records": records,
    }
