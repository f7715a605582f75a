"""The Prefect artifacts and logs a person sees, read back from Prefect's API.

The module's main test runs the real pretrain flow (real stage task, real torchrun
child, Prefect's ephemeral API) on a tiny model and a hand-made shards artifact, then
reads the flow run's logs and artifacts back with a Prefect client. The builders are
tested on records and files whose numbers are known.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

from flows.artifacts import (
    artifact_key,
    export_markdown,
    funnel_table,
    loss_markdown,
    loss_rows,
    publish_run,
    stages_table,
)
from flows.records import StageRecord
from storage.artifact import Store
from tasks.modeling.loss_plot import LossHistory, plot_loss, read_loss_history, thin
from tasks.prefect_task import PrefectProgress, progress_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_STEPS, LOG_EVERY, EVAL_EVERY = 12, 2, 4


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (asserting the signature on the way)."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def flow_artifacts(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def flow_logs(flow_run_id) -> list:
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


# --- the pretrain flow, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from flows.config import PipelineConfig
    from flows.pretrain import pretrain

    root = tmp_path_factory.mktemp("artifacts") / "store"
    store = Store(root)
    with store.writer("tokenizer", "tok0") as w:
        (w.dir / "tokenizer.json").write_text("{}")
    tok = w.manifest
    with store.writer("shards", "shards0", parents=[tok]) as w:
        (np.arange(6000) * 7 % 61).astype("<u2").tofile(w.dir / "tokens-train-00000.bin")
        (np.arange(1200) * 7 % 61).astype("<u2").tofile(w.dir / "tokens-val-00000.bin")
        w.meta.update({"dtype": "uint16", "vocab_size": 64, "eot_id": 0})
    shards = w.manifest
    config = PipelineConfig(
        store=str(root),
        pretrain={
            "model": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32},
            "train": {
                "max_steps": MAX_STEPS,
                "micro_batch_size": 2,
                "block_size": 16,
                "warmup_steps": 1,
                "lr": 1e-2,
                "min_lr": 1e-3,
                "eval_every": EVAL_EVERY,
                "eval_batches": 2,
                "ckpt_every": 0,
                "log_every": LOG_EVERY,
                "nproc": 1,
            },
        },
        finetune={"train": {"block_size": 16}},  # a model of 16 tokens is finetuned on 16-token windows
    )
    state = pretrain(config, dataset=shards.ref, return_state=True)
    result = state.result()
    return {"store": store, "result": result, "flow_run_id": state.state_details.flow_run_id}


@pytest.mark.slow
def test_torchrun_child_lines_reach_the_task_run_log(pretrained):
    logs = flow_logs(pretrained["flow_run_id"])
    steps = {int(m.group(1)): log for log in logs if (m := re.match(rf"step (\d+)/{MAX_STEPS} \| loss ", log.message))}
    assert sorted(steps) == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))
    # Filed under the pretrain task run, not only the flow run.
    assert all(log.task_run_id is not None for log in steps.values())
    assert any(log.message.startswith("done: {") for log in logs)


@pytest.mark.slow
def test_training_progress_reaches_100(pretrained):
    artifacts = flow_artifacts(pretrained["flow_run_id"])
    progress = artifacts[progress_key("pretrain")]
    assert progress.type == "progress"
    assert float(progress.data) == 100.0


@pytest.mark.slow
def test_loss_table_has_every_logged_step_and_the_validation_losses(pretrained):
    store = pretrained["store"]
    model = store.load(*pretrained["result"]["model"].split("/"))
    rows = table(flow_artifacts(pretrained["flow_run_id"])["pretrain-loss"])
    assert [r["step"] for r in rows] == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))
    assert {r["step"] for r in rows if r["val_loss"] is not None} == set(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    # The same numbers as the artifact's metrics log and the training summary.
    history = read_loss_history(model.path("metrics.jsonl"))
    assert [r["train_loss"] for r in rows] == [r["loss"] for r in history.train]
    assert rows[-1]["val_loss"] == pytest.approx(model.counters["val_loss"])


@pytest.mark.slow
def test_loss_curve_png_is_in_the_artifact_and_embedded_in_markdown(pretrained):
    store = pretrained["store"]
    model = store.load(*pretrained["result"]["model"].split("/"))
    png = model.path("loss.png").read_bytes()
    assert png_size(png) == (800, 450)
    assert "loss.png" in {f.path for f in model.files}  # published and checksummed with the model
    md = flow_artifacts(pretrained["flow_run_id"])["pretrain-loss-curve"]
    assert md.type == "markdown"
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", md.data).group(1)
    assert base64.b64decode(embedded) == png
    assert model.path("loss.png").as_uri() in md.data


@pytest.mark.slow
def test_stage_table_of_the_flow(pretrained):
    rows = table(flow_artifacts(pretrained["flow_run_id"])["pretrain-stages"])
    assert [(r["stage"], r["state"], r["cached"], r["artifact"]) for r in rows] == [
        ("pretrain", "Completed", False, pretrained["result"]["model"])
    ]


# --- progress ---------------------------------------------------------------------------------


def test_progress_is_a_no_op_outside_prefect():
    p = PrefectProgress("crawl", "pages fetched")
    p(0.5)
    p(1.0)
    assert not p.active


@pytest.mark.slow  # runs a Prefect flow: a temporary Prefect server starts (about 20 s)
def test_progress_throttles_and_never_raises(caplog):
    @task
    def work() -> tuple[str, list[float]]:
        p = PrefectProgress("Crawl Stage", "pages fetched", min_seconds=3600, min_step=0.1)
        assert p.active and p.key == "crawl-stage-progress"
        written = []
        for i in range(101):
            before = p._last_fraction
            p(i / 100)
            if p._last_fraction != before:
                written.append(p._last_fraction)
        p.done()
        broken = PrefectProgress("broken", "an id the API does not know")
        broken._id = "00000000-0000-0000-0000-000000000000"
        broken(0.5)  # the API answers 404: a warning, then nothing
        assert not broken.active
        return str(p._id), written

    @flow
    def run_it():
        return work()

    artifact_id, written = run_it()
    assert written == pytest.approx([0.1 * k for k in range(1, 11)])  # +10% steps only, with a 1 h interval
    with get_client(sync_client=True) as client:
        (artifact,) = [a for a in client.read_artifacts() if str(a.id) == artifact_id]
    assert float(artifact.data) == 100.0
    assert any("progress artifact disabled" in r.getMessage() for r in caplog.records)


# --- builders ---------------------------------------------------------------------------------


def _records() -> dict[str, StageRecord]:
    return {
        "ingest": StageRecord("ingest", "Completed", False, 1.5, "ingest/a", docs_in=None, docs_out=10, words_out=1000),
        "dedup": StageRecord(
            "dedup",
            "Cached",
            True,
            0.1,
            "dedup/b",
            docs_in=10,
            docs_out=7,
            words_in=1000,
            words_out=700,
            dropped={"exact_duplicate": {"docs": 1, "words": 100}, "near_duplicate": {"docs": 2, "words": 200}},
        ),
        "pretrain": StageRecord("pretrain", "Completed", False, 30.0, "pretrain/c"),
    }


def test_funnel_table_rows_per_stage_then_per_reason():
    assert funnel_table(_records()) == [
        {"stage": "ingest", "drop reason": "", "docs in": None, "docs out": 10, "words in": None, "words out": 1000},
        {"stage": "dedup", "drop reason": "", "docs in": 10, "docs out": 7, "words in": 1000, "words out": 700},
        {
            "stage": "dedup",
            "drop reason": "near_duplicate",
            "docs in": None,
            "docs out": -2,
            "words in": None,
            "words out": -200,
        },
        {
            "stage": "dedup",
            "drop reason": "exact_duplicate",
            "docs in": None,
            "docs out": -1,
            "words in": None,
            "words out": -100,
        },
    ]


def test_stages_table():
    rows = stages_table(_records())
    assert [(r["stage"], r["state"], r["cached"], r["seconds"], r["artifact"]) for r in rows] == [
        ("ingest", "Completed", False, 1.5, "ingest/a"),
        ("dedup", "Cached", True, 0.1, "dedup/b"),
        ("pretrain", "Completed", False, 30.0, "pretrain/c"),
    ]


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Data_Refresh", "stages") == "data-refresh-stages"
    assert progress_key("finetune") == "finetune-progress"


@pytest.mark.slow  # reads the Prefect API: a temporary Prefect server starts (about 20 s)
def test_publishing_outside_a_run_is_a_no_op():
    def published() -> int:
        with get_client(sync_client=True) as client:
            return len(
                client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["data-funnel", "outside-stages"]}))
            )

    before = published()
    publish_run("outside", _records(), funnel=True)
    assert published() == before


def _metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_rows_merge_validation_keep_the_resumed_run_and_thin(tmp_path):
    rows = [{"step": s, "loss": 10.0 - s / 100, "lr": 1e-3, "tokens": 64 * s} for s in range(1, 501)]
    rows += [{"step": s, "val_loss": 9.0 - s / 100} for s in range(100, 501, 100)]
    rows.insert(50, {"step": 40, "loss": 99.0})  # a killed run's last rows, replayed after resume...
    rows.append({"step": 40, "loss": 1.5})  # ...the later row wins
    metrics = _metrics(tmp_path / "metrics.jsonl", rows)
    with open(metrics, "a") as f:
        f.write('{"step": 501, "lo')  # a line cut by a kill
    full = loss_rows(metrics, max_rows=10_000)
    assert [r["step"] for r in full] == list(range(1, 501))
    assert full[39]["train_loss"] == 1.5
    assert {r["step"]: r["val_loss"] for r in full if r["val_loss"] is not None} == {
        s: 9.0 - s / 100 for s in range(100, 501, 100)
    }
    thinned = loss_rows(metrics, max_rows=200)
    assert len(thinned) == 200 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 500
    assert all(a["step"] < b["step"] for a, b in zip(thinned, thinned[1:]))
    assert thin(list(range(5)), 10) == [0, 1, 2, 3, 4]


def test_plot_loss_writes_a_png_even_without_validation(tmp_path):
    out = plot_loss(
        LossHistory(train=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]), tmp_path / "loss.png", "pretrain"
    )
    assert png_size(out.read_bytes()) == (800, 450)


def test_loss_markdown_without_a_plot(tmp_path):
    store = Store(tmp_path / "store")
    with store.writer("pretrain", "k1") as w:
        _metrics(w.dir / "metrics.jsonl", [{"step": 1, "loss": 3.0}])
        w.counters.update({"steps": 1, "stopped_by": "max_steps", "train_loss": 3.0, "val_loss": None})
    md = loss_markdown(w.manifest)
    assert "No loss plot" in md and "final train loss 3.0000" in md and "validation loss n/a" in md


def test_export_markdown_lists_files_with_sizes_and_the_gate(tmp_path):
    store = Store(tmp_path / "store")
    with store.writer("export", "k2") as w:
        (w.dir / "model.onnx").write_bytes(b"x" * 3 * 1024 * 1024)
        (w.dir / "model.int8.onnx").write_bytes(b"y" * 800 * 1024)
        (w.dir / "tokenizer.json").write_bytes(b"{}")
        w.meta.update(
            {
                "files": {"fp32": "model.onnx", "int8": "model.int8.onnx"},
                "gate": "passed: int8 +0.4%",
                "parity_max_abs_diff": 2.5e-5,
                "val_loss": {"torch": 2.0, "onnx_int8": 2.008},
            }
        )
    m = w.manifest
    md = export_markdown(m)
    assert f"[model.onnx]({m.path('model.onnx').as_uri()}) | fp32 | 3.0 MiB |" in md
    assert "| int8 | 800.0 KiB |" in md and f"[tokenizer.json]({m.path('tokenizer.json').as_uri()}) |  | 2 B |" in md
    assert m.dir.as_uri() in md and "passed: int8 +0.4%" in md and "| onnx_int8 | 2.0080 |" in md


def test_export_markdown_sets_the_precisions_side_by_side(tmp_path):
    store = Store(tmp_path / "store")
    with store.writer("export", "k3") as w:
        (w.dir / "model.onnx").write_bytes(b"x")
        w.meta["precisions"] = {
            "fp32": {"bytes": 4 << 20, "val_loss": 2.0, "bits_per_byte": 1.2},
            "int8": {"bytes": 1 << 20, "val_loss": 2.01, "bits_per_byte": 1.206},
            "int4": {"bytes": 600 << 10, "val_loss": 2.06, "bits_per_byte": 1.236},
        }
    md = export_markdown(w.manifest)
    assert "| fp32 | 4.0 MiB | 2.0000 | 1.2000 | +0.00% |" in md
    assert "| int8 | 1.0 MiB | 2.0100 | 1.2060 | +0.50% |" in md
    assert "| int4 | 600.0 KiB | 2.0600 | 1.2360 | +3.00% |" in md


@pytest.mark.slow  # runs a Prefect flow: a temporary Prefect server starts (about 20 s)
def test_release_and_data_artifacts_read_back_from_the_api(tmp_path):
    from flows.artifacts import publish_evaluation, publish_export

    store = Store(tmp_path / "store")
    with store.writer("evaluate", "e1") as w:
        (w.dir / "report.md").write_text("# Evaluation\n\n| model | bits/byte |\n|---|---:|\n| finetuned | 1.2345 |\n")
        (w.dir / "report.json").write_text(json.dumps({"finetuned": {"bits_per_byte": 1.2345}}))
        w.meta["bits_per_byte"] = {"base": 1.5, "finetuned": 1.2345}
    report = w.manifest
    with store.writer("export", "x1") as w:
        (w.dir / "model.onnx").write_bytes(b"f" * 2048)
        (w.dir / "model.int8.onnx").write_bytes(b"i" * 1024)
        w.meta["files"] = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    exported = w.manifest

    @flow
    def release_like():
        publish_evaluation(report)
        publish_export(exported)
        publish_run("release-like", _records(), funnel=True)

    state = release_like(return_state=True)
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {
        "evaluation-report",
        "exported-model",
        "exported-model-files",
        "release-like-stages",
        "data-funnel",
    }
    assert "| finetuned | 1.2345 |" in artifacts["evaluation-report"].data
    assert artifacts["evaluation-report"].description == "Held-out bits per byte: base 1.5000, finetuned 1.2345"
    # Prefect stores a link artifact as markdown: [text](link).
    assert artifacts["exported-model"].data == f"[INT8 ONNX model {exported.ref}]({exported.dir.as_uri()})"
    assert (
        "| int8 | 1.0 KiB |" in artifacts["exported-model-files"].data
        and "| fp32 | 2.0 KiB |" in artifacts["exported-model-files"].data
    )
    assert table(artifacts["data-funnel"]) == funnel_table(_records())
    assert [r["stage"] for r in table(artifacts["release-like-stages"])] == ["ingest", "dedup", "pretrain"]


@pytest.mark.slow  # runs a Prefect flow: a temporary Prefect server starts (about 20 s)
def test_a_failing_artifact_logs_and_the_flow_goes_on(tmp_path, caplog):
    from flows.artifacts import publish_evaluation

    store = Store(tmp_path / "store")
    with store.writer("evaluate", "e2") as w:
        (w.dir / "report.json").write_text("{}")  # no report.md
    broken = w.manifest

    @flow
    def goes_on() -> str:
        publish_evaluation(broken)
        return "finished"

    assert goes_on() == "finished"
    assert any("could not publish the evaluation-report artifact" in r.getMessage() for r in caplog.records)
