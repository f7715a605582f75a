"""The release candidate beside the promoted model: one step the release and deploy flows share.

The release flow runs it to show the candidate next to what is serving; the deploy flow
runs it again holding the target's lock (a cache hit unless another deploy promoted
something meanwhile) and decides on it.
"""

from __future__ import annotations

from flows.config import PipelineConfig
from flows.records import StageRecord, run_stage
from flows.refs import parent_of
from storage import promotions
from storage.artifact import Manifest, Store
from storage.catalog import register_dataset
from tasks import compare as compare_stage
from tasks.stage import StageError


def promoted_export(store: Store, target: str, candidate: Manifest) -> Manifest | None:
    """The export a candidate is compared with: the one promoted for ``target`` now, or, when
    that is the candidate itself, the one it replaced (None when there is none).

    So a release compared before its promotion is compared with the same model after it,
    and a rerun of an unchanged pipeline finds its comparison in the cache.
    """
    stack = promotions.history(promotions.ledger(store, target))
    if stack and stack[-1] == candidate.ref:
        stack.pop()
    if not stack:
        return None
    ref = stack[-1]
    manifest = store.load(*ref.split("/", 1))
    if manifest is None:
        raise StageError(
            "deploy",
            ref,
            f"the model promoted for target {target!r} is no longer in the store {store.root}",
            "restore it, or go back to the one before with `lmforge deploy --rollback`",
        )
    return manifest


def compare_with_promoted(
    records: dict[str, StageRecord], store: Store, config: PipelineConfig, candidate: Manifest
) -> tuple[Manifest, Manifest | None]:
    """Run the compare stage on ``candidate`` and the promoted model; returns (comparison, promoted)."""
    promoted = promoted_export(store, config.deploy_target, candidate)
    data = parent_of(store, candidate, "shards")
    register_dataset(store, data)
    comparison = run_stage(
        records,
        "compare",
        compare_stage.task,
        store=store,
        cfg=config.deploy.compare,
        candidate=candidate,
        promoted=promoted,
        shards=data,
        tokenizer=parent_of(store, data, "tokenizer"),
    )
    return comparison, promoted


def lineage_of(store: Store, export: Manifest) -> dict[str, str]:
    """The refs a promotion record names: the model, its base model, its dataset and tokenizer."""
    out = {}
    model = parent_of(store, export, "finetune")
    out["model"] = model.ref
    out["base_model"] = next((p for p in model.parents if p.startswith("pretrain/")), None)
    data = parent_of(store, export, "shards")
    out["dataset"] = data.ref
    out["tokenizer"] = next((p for p in data.parents if p.startswith("tokenizer/")), None)
    return out
