"""Flow: promote a release only when it is not worse than the model serving now; or roll back.

    release (export artifact) -> compare with the promoted model -> promote | refuse

The decision is appended to the target's ledger in the store (:mod:`storage.promotions`),
mirrored into the catalog's ``promotions`` table, published as a Prefect artifact
(``deploy-<target>``: promoted or not, and why) and as an event
(``lmforge.model.promoted`` / ``lmforge.model.refused``) that automations can follow.
A running ``lmforge serve --promoted`` picks a promotion up by itself.

A refusal is an answer, not a failure: the run completes and says why. Deploying the
export that is already promoted changes nothing and says so. When another machine
decides for the same target while this run compares (an ``s3://`` store shared by
several hosts), the decision is not written against the old model: the run compares
again with the newly promoted one, up to ``DECIDE_ATTEMPTS`` times.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, runtime

from flows.artifacts import publish_comparison, publish_decision, publish_run
from flows.comparison import compare_with_promoted, lineage_of
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.events import MODEL_PROMOTED, MODEL_REFUSED, announce
from flows.records import StageRecord
from flows.refs import load_ref
from flows.release import release as release_flow
from storage import promotions
from storage.artifact import Store
from storage.faults import pause_point
from tasks.compare import decide

DECIDE_ATTEMPTS = 3
"""Comparisons a deploy makes when other machines keep deciding for its target meanwhile."""


def _run_label() -> str:
    name, run_id = runtime.flow_run.name, runtime.flow_run.id
    return f"flow run {name} ({run_id})" if run_id else "cli"


@flow(name="deploy", log_prints=True)
def deploy(
    config: PipelineConfig = DEFAULT_CONFIG,
    release: str | None = None,
    rollback: bool = False,
) -> dict:
    """Promote ``release`` if it is not worse than the promoted model (or roll back); returns the decision.

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
        release: Export artifact ref ('export/<key>') to deploy; empty builds it with the release flow.
        rollback: Restore the model promoted before the current one instead (release is ignored).
    """
    store = Store(config.store)
    target = promotions.check_target(config.deploy_target)
    records: dict[str, StageRecord] = {}
    log = get_run_logger()
    if rollback:
        with promotions.decision_lock(store, target):
            decision = promotions.rollback(
                store, target, run=_run_label(), lineage=lambda ref: lineage_of(store, load_ref(store, ref, "export"))
            )
        restored = load_ref(store, decision.export, "export")
        return _announce(store, decision.to_dict(), None, restored, records, log)
    if not release:
        upstream = release_flow(config)
        release, records = upstream["export"], dict(upstream["records"])
    candidate = load_ref(store, release, "export")
    for attempt in range(1, DECIDE_ATTEMPTS + 1):
        with promotions.decision_lock(store, target):
            seen, promoted_ref = promotions.state(store, target)
            if promoted_ref == candidate.ref:
                unchanged = {
                    "action": "unchanged",
                    "target": target,
                    "export": candidate.ref,
                    "previous": candidate.ref,
                    "serving": candidate.ref,
                    "reason": "it is already the promoted model",
                }
                return _announce(store, unchanged, None, candidate, records, log)
            comparison, _ = compare_with_promoted(records, store, config, candidate)
            bpb = comparison.meta["bits_per_byte"]
            ok, reason = decide(bpb["candidate"], bpb.get("promoted"), config.deploy.max_bpb_increase)
            metrics = {
                "candidate_bits_per_byte": bpb["candidate"],
                "promoted_bits_per_byte": bpb.get("promoted"),
                "max_bpb_increase": config.deploy.max_bpb_increase,
                "precision": comparison.meta["precision"],
                "documents": comparison.meta["documents"],
                "comparison": comparison.ref,
            }
            pause_point("deploy")  # a drill's hook: another machine decides while this one has compared
            try:
                decision = promotions.record(
                    store,
                    target,
                    "promote" if ok else "refuse",
                    candidate.ref,
                    reason,
                    metrics=metrics,
                    lineage=lineage_of(store, candidate),
                    run=_run_label(),
                    after=seen,
                )
                break
            except promotions.LedgerMoved as e:
                if attempt == DECIDE_ATTEMPTS:
                    raise
                log.warning(
                    "%s; comparing again with the model promoted now (attempt %d of %d)",
                    e,
                    attempt + 1,
                    DECIDE_ATTEMPTS,
                )
    return _announce(store, decision.to_dict(), comparison, candidate, records, log)


def _announce(store, decision: dict, comparison, export, records, log) -> dict:
    """Catalog, Prefect artifacts, event and log line of a decision; the flow's return value."""
    target = decision["target"]
    promotions.index_in_catalog(store, target, export)  # derived data: a lost catalog gets its rows back
    if comparison is not None:
        publish_comparison(comparison)
    publish_decision(decision, comparison)
    publish_run("deploy", records, funnel=bool(records))  # the data behind the model, on the deploy run too
    if decision["action"] in ("promote", "refuse", "rollback"):
        announce(
            MODEL_REFUSED if decision["action"] == "refuse" else MODEL_PROMOTED,
            decision["export"],
            target=target,
            **{k: decision.get(k) for k in ("action", "export", "previous", "serving", "reason", "seq")},
        )
    log.info("deploy %s: %s %s: %s", target, decision["action"], decision["export"], decision["reason"])
    return {
        "decision": decision,
        "export": export.ref,
        "comparison": comparison.ref if comparison is not None else None,
        "records": records,
    }
