"""What a person sees of a run in the Prefect UI: its artifacts, built from the stages' manifests.

Design decisions:
- Every artifact is built from what the flow already holds (its StageRecords and the
  published manifests' files), never from a second source, so the UI, ``summary.json``
  and the catalog show the same numbers; a stage served from cache gets its artifacts
  again, so every run shows them.
- Builders (``*_rows``, ``*_markdown``) are pure functions of records and files, unit
  tested; ``publish_*`` send them to Prefect. Publishing is reporting, not work: any
  failure (no API, a bad file) logs a warning and the run goes on.
- Keys are fixed names (lowercase letters, digits, dashes, as Prefect requires), so the
  Artifacts page keeps one history per thing: ``data-funnel``, ``<flow>-stages``,
  ``<stage>-loss``, ``<stage>-loss-curve``, ``evaluation-report``, ``exported-model``,
  ``exported-model-files``, ``lm-eval-report``, ``release-vs-promoted`` and ``deploy-<target>``.
- The loss curve is embedded in markdown as a base64 ``data:`` URI (Prefect's image
  artifact takes only a URL, and a run's PNG lives on local disk), next to a link to the
  file itself.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any, Callable

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.records import StageRecord
from flows.summary import funnel_rows
from storage.artifact import Manifest
from tasks.modeling.loss_plot import read_loss_history, thin
from tasks.stage import stage_logger

MAX_LOSS_ROWS = 200
_log = stage_logger("artifacts")


def artifact_key(*parts: str) -> str:
    """Join parts into a Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


# --- builders (pure) -----------------------------------------------------------------------


def funnel_table(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """The funnel rows (per stage, then per drop reason) with readable column names."""
    return [
        {
            "stage": r["stage"],
            "drop reason": r["reason"],
            "docs in": r["docs_in"],
            "docs out": r["docs_out"],
            "words in": r["words_in"],
            "words out": r["words_out"],
        }
        for r in funnel_rows(records)
    ]


def stages_table(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """One row per stage the flow ran: state, cache hit, seconds, artifact ref."""
    return [
        {"stage": n, "state": r.status, "cached": r.cached, "seconds": r.seconds, "artifact": r.artifact}
        for n, r in records.items()
    ]


def loss_rows(metrics: Path, max_rows: int = MAX_LOSS_ROWS) -> list[dict[str, Any]]:
    """The loss per logged step (train and, where evaluated, validation), thinned to ``max_rows``."""
    return thin(read_loss_history(metrics).rows(), max_rows)


def loss_markdown(manifest: Manifest) -> str:
    """The loss curve PNG embedded as a data: URI, a link to the file, and the final losses."""
    c = manifest.counters
    lines = [
        f"# {manifest.stage}: loss curve",
        "",
        f"Artifact `{manifest.ref}`: {c.get('steps', '?')} steps, "
        f"stopped by {c.get('stopped_by', '?')}, final train loss {_num(c.get('train_loss'))}, "
        f"validation loss {_num(c.get('val_loss'))}.",
        "",
    ]
    png = manifest.path("loss.png")
    if png.exists():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        lines += [f"![{manifest.stage} loss curve](data:image/png;base64,{data})", "", f"File: [{png}]({png.as_uri()})"]
    else:
        lines.append("No loss plot in this artifact (see the stage's log for why).")
    return "\n".join(lines)


def evaluation_markdown(manifest: Manifest) -> str:
    """The evaluate stage's ``report.md``, with the artifact it came from."""
    md = manifest.path("report.md").read_text()
    return f"{md}\n\nArtifact `{manifest.ref}` ({manifest.path('report.json')})."


def export_markdown(manifest: Manifest) -> str:
    """Where the exported model is: every file with its size, the gate's verdict and losses."""
    meta = manifest.meta
    names = meta.get("files", {})
    lines = [
        "# Exported model",
        "",
        f"Directory: [{manifest.dir}]({manifest.dir.as_uri()})",
        "",
        "| file | kind | size |",
        "|---|---|---:|",
    ]
    kinds = {v: k for k, v in names.items()}
    for f in sorted(manifest.files, key=lambda f: f.path):
        lines.append(f"| [{f.path}]({manifest.path(f.path).as_uri()}) | {kinds.get(f.path, '')} | {_size(f.bytes)} |")
    if meta.get("gate"):
        lines += ["", f"Release gate: {meta['gate']}"]
    if meta.get("parity_max_abs_diff") is not None:
        lines.append(f"Largest |ONNX fp32 - torch| logit difference: {meta['parity_max_abs_diff']:.3g}")
    precisions = meta.get("precisions") or {}
    if precisions:
        base = precisions.get("fp32", {}).get("val_loss")
        lines += ["", "| precision | size | validation loss | bits/byte | loss vs fp32 |", "|---|---:|---:|---:|---:|"]
        for name, p in precisions.items():
            change = f"{(p['val_loss'] - base) / base:+.2%}" if base and p.get("val_loss") is not None else "n/a"
            lines.append(
                f"| {name} | {_size(p['bytes'])} | {_num(p.get('val_loss'))} | {_num(p.get('bits_per_byte'))} | {change} |"
            )
    elif meta.get("val_loss"):
        lines += [
            "",
            "| model | validation loss |",
            "|---|---:|",
            *(f"| {k} | {_num(v)} |" for k, v in meta["val_loss"].items()),
        ]
    return "\n".join(lines)


def comparison_markdown(manifest: Manifest) -> str:
    """The compare stage's ``compare.md``: the candidate beside the promoted model."""
    return f"{manifest.path('compare.md').read_text()}\nArtifact `{manifest.ref}`."


def decision_markdown(decision: dict[str, Any], comparison: Manifest | None) -> str:
    """What a deploy run decided, and why, above the comparison it decided on."""
    verdict = {
        "promote": "**Promoted**",
        "refuse": "**Not promoted**",
        "rollback": "**Rolled back**",
        "unchanged": "**Unchanged**",
    }[decision["action"]]
    lines = [
        f"# Deploy to `{decision['target']}`",
        "",
        f"{verdict}: `{decision['export']}`. {decision['reason'][:1].upper()}{decision['reason'][1:]}.",
        "",
        f"Serving now: `{decision.get('serving') or 'nothing'}` (before: `{decision.get('previous') or 'nothing'}`).",
    ]
    if decision.get("seq"):
        lines.append(f"Ledger entry {decision['seq']}, decided at {decision['decided_at']} by {decision['run']}.")
    lineage = decision.get("lineage") or {}
    if lineage:
        lines += ["", "| lineage | artifact |", "|---|---|", *(f"| {k} | `{v}` |" for k, v in lineage.items())]
    if comparison is not None:
        lines += ["", comparison_markdown(comparison)]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"


# --- publishing (Prefect) --------------------------------------------------------------------


def _publish(what: str, make: Callable[[], Any]) -> bool:
    """Run one artifact creation; log a warning instead of failing the run.

    Outside a flow or task run (a flow's function called as plain Python) there is no
    run to attach to, and Prefect deprecates unattached artifacts: nothing is published.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False
    try:
        make()
        return True
    except Exception as e:
        _log.warning("could not publish the %s artifact (%s: %s)", what, type(e).__name__, e)
        return False


def publish_run(flow_name: str, records: dict[str, StageRecord], funnel: bool = False) -> None:
    """What every flow publishes at its end: its stage table, and the data funnel if asked."""
    publish_stages(flow_name, records)
    if funnel:
        publish_funnel(records)


def publish_funnel(records: dict[str, StageRecord]) -> None:
    """The data funnel as a table artifact (``data-funnel``)."""

    def make():
        rows = funnel_table(records)
        if rows:
            create_table_artifact(
                rows,
                key="data-funnel",
                description="Documents and whitespace words in/out per stage, then dropped per reason (negative).",
            )

    _publish("data-funnel", make)


def publish_stages(flow_name: str, records: dict[str, StageRecord]) -> None:
    """The stages the flow ran as a table artifact (``<flow>-stages``)."""
    key = artifact_key(flow_name, "stages")
    _publish(
        key,
        lambda: create_table_artifact(
            stages_table(records),
            key=key,
            description=f"{flow_name}: state, cache hit, seconds and artifact of each stage.",
        ),
    )


def publish_training(manifest: Manifest) -> None:
    """A training stage's loss as a table (``<stage>-loss``) and as a picture (``<stage>-loss-curve``)."""
    stage = manifest.stage
    metrics = manifest.path("metrics.jsonl")
    _publish(
        artifact_key(stage, "loss"),
        lambda: create_table_artifact(
            loss_rows(metrics),
            key=artifact_key(stage, "loss"),
            description=f"{stage}: loss per logged step (at most {MAX_LOSS_ROWS} rows, evenly spaced) from {manifest.ref}.",
        ),
    )
    _publish(
        artifact_key(stage, "loss-curve"),
        lambda: create_markdown_artifact(
            loss_markdown(manifest),
            key=artifact_key(stage, "loss-curve"),
            description=f"{stage}: train and validation loss against step.",
        ),
    )


def publish_evaluation(manifest: Manifest) -> None:
    """The evaluation report as markdown (``evaluation-report``)."""

    def make():
        bpb = manifest.meta.get("bits_per_byte", {})
        desc = "Held-out bits per byte: " + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items())
        create_markdown_artifact(evaluation_markdown(manifest), key="evaluation-report", description=desc)

    _publish("evaluation-report", make)


def publish_export(manifest: Manifest) -> None:
    """A link to the exported model's directory (``exported-model``) and its files (``exported-model-files``)."""
    _publish(
        "exported-model",
        lambda: create_link_artifact(
            manifest.dir.as_uri(),
            link_text=f"INT8 ONNX model {manifest.ref}",
            key="exported-model",
            description=f"Exported model directory: {manifest.dir}",
        ),
    )
    _publish(
        "exported-model-files",
        lambda: create_markdown_artifact(
            export_markdown(manifest),
            key="exported-model-files",
            description="Files of the exported model with their sizes, and the release gate.",
        ),
    )


def publish_harness(manifest: Manifest) -> None:
    """lm-evaluation-harness scores beside lmforge's bits per byte (``lm-eval-report``)."""
    _publish(
        "lm-eval-report",
        lambda: create_markdown_artifact(
            f"{manifest.path('report.md').read_text()}\nArtifact `{manifest.ref}`.",
            key="lm-eval-report",
            description="lm-evaluation-harness on the Hugging Face export: bits per byte and cloze accuracy per language.",
        ),
    )


def publish_comparison(manifest: Manifest) -> None:
    """The release candidate beside the promoted model (``release-vs-promoted``)."""

    def make():
        bpb = manifest.meta.get("bits_per_byte", {})
        desc = "Held-out bits per byte: " + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items())
        create_markdown_artifact(comparison_markdown(manifest), key="release-vs-promoted", description=desc)

    _publish("release-vs-promoted", make)


def publish_decision(decision: dict[str, Any], comparison: Manifest | None) -> None:
    """What a deploy run decided and why (``deploy-<target>``)."""
    key = artifact_key("deploy", decision["target"])
    _publish(
        key,
        lambda: create_markdown_artifact(
            decision_markdown(decision, comparison),
            key=key,
            description=f"{decision['action']}: {decision['export']} ({decision['reason']})",
        ),
    )
