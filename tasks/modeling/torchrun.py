"""What pretrain and finetune share: the train spec, the torchrun child, publishing its model.

Design decisions:
- The task never trains in its own process: it writes a train spec (model.train's JSON
  format) into the store's work directory for its key and starts torchrun as a child
  (model.launch). The child's lines stream into the task's log.
- The work directory outlives a crash or a kill: checkpoints land there, and the next
  run of the same key resumes from the latest one (the Trainer does this), so a killed
  pretraining loses at most ``ckpt_every`` steps. Only the final model is published, by
  the usual atomic artifact write (:func:`publish_model`).
- Progress: the child's ``step N/M`` lines (model.trainer's log line) move the stage's
  progress callback, so the UI shows how far training is without a second channel from
  the child; a resumed run starts the bar at its checkpoint step.
- A spec that does not validate is a StageError before torchrun starts, never retried:
  the profile was checked when it was loaded, so this means a bug, and a retry would
  fail the same way.
- The loss curve (``loss.png``, :mod:`tasks.modeling.loss_plot`) is drawn from
  ``metrics.jsonl`` when the artifact is written. It is a view of the run, not the model:
  a plotting failure logs a warning and publishes the model without it, and the plotting
  module is left out of the stages' code version, so restyling a figure never retrains
  a model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pydantic import ValidationError

from storage.artifact import Manifest, Store
from tasks.stage import Begun, Progress, Stage, StageError, stage_logger
from tasks.text.settings import describe

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")
SUMMARY_KEYS = (
    "steps",
    "stopped_by",
    "tokens",
    "train_loss",
    "val_loss",
    "wall_s",
    "tokens_per_s",
    "params",
    "trainable_params",
    "world",
    "device",
)


def data_files(paths: list[Path], dtype: str) -> list[dict]:
    return [{"path": str(p), "dtype": dtype} for p in paths]


def train_in_child(stage: str, work: Path, spec: dict, nproc: int | None, progress: Progress) -> Path:
    """Write the spec, run torchrun, return the final model dir the child published."""
    from model.launch import default_nproc, launch

    log = stage_logger(stage)
    final = work / "final"
    spec = {**spec, "out_dir": str(work / "checkpoints"), "artifact_dir": str(final)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    n = nproc or default_nproc()
    log.info("%s: launching torchrun with %d process(es); spec %s", stage, n, spec_path)

    def on_line(line: str) -> None:
        # Logged from the task's own thread (launch reads the pipe there), so Prefect's
        # API handler finds the task run's context and files the line under it.
        log.info("%s", line)
        m = STEP_LINE.match(line)
        if m:
            progress(int(m.group(1)) / max(int(m.group(2)), 1))

    try:
        launch(spec_path, n, on_line=on_line, env={"LMFORGE_STAGE": stage})
    except ValueError as e:  # raised before torchrun starts: nothing ran, and a retry would fail the same way
        reason = describe(e) if isinstance(e, ValidationError) else str(e)
        raise StageError(
            stage, str(spec_path), f"the train spec is not valid: {reason}", "fix the train settings of the profile"
        ) from None
    except RuntimeError as e:
        raise RuntimeError(f"[{stage}] {e}") from None
    progress(1.0)
    if not (final / "model.safetensors").exists():
        raise StageError(stage, str(final), "training finished without writing a model")
    return final


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def write_loss_plot(stage: str, metrics: Path, out: Path) -> Path | None:
    """Draw ``metrics.jsonl`` as ``out`` (PNG); None, with a warning, when it cannot."""
    from tasks.modeling.loss_plot import plot_loss, read_loss_history

    try:
        return plot_loss(read_loss_history(metrics), out, title=f"{stage}: loss per optimizer step")
    except Exception as e:  # the model is the product; the picture is a convenience
        stage_logger(stage).warning("%s: no loss plot (%s: %s)", stage, type(e).__name__, e)
        return None


def publish_model(
    store: Store,
    stage: Stage,
    begun: Begun,
    final: Path,
    tokenizer: Manifest,
    *,
    model_files: tuple[str, ...] = ("model.safetensors", "config.json", "summary.json"),
    counters: dict | None = None,
    meta: dict | None = None,
) -> Manifest:
    """The trained model artifact: the child's model files, its metrics and loss curve, the
    tokenizer, and counters from the child's summary (plus ``counters`` and ``meta``)."""
    with stage.writer(store, begun) as w:
        _copy(final, w.dir, model_files)
        _copy(final.parent / "checkpoints", w.dir, ("metrics.jsonl",))
        write_loss_plot(stage.name, w.dir / "metrics.jsonl", w.dir / "loss.png")
        _copy(tokenizer.dir, w.dir, ("tokenizer.json",))
        summary = json.loads((final / "summary.json").read_text())
        w.counters.update({k: summary[k] for k in SUMMARY_KEYS if k in summary})
        w.counters.update(counters or {})
        w.meta.update(meta or {})
    return w.manifest
