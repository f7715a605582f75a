"""What pretrain and finetune share: the train settings form, the spec, the torchrun child.

Design decisions:
- The task never trains in its own process: it writes a train spec (model.train's JSON
  format) into the store's work directory for its key and starts torchrun as a child
  (model.launch). The child's lines stream into the task's log.
- The work directory outlives a crash or a kill: checkpoints land there, and the next
  run of the same key resumes from the latest one (the Trainer does this), so a killed
  pretraining loses at most ``ckpt_every`` steps. Only the final model is published, by
  the usual atomic artifact write.
- Progress: the child's ``step N/M`` lines (model.trainer's log line) drive a Prefect
  progress artifact (tasks.progress), so the UI shows how far training is without a
  second channel from the child; a resumed run starts the bar at its checkpoint step.
- The loss curve (``loss.png``, tasks.plots) is drawn from ``metrics.jsonl`` when the
  artifact is written. It is a view of the run, not the model: a plotting failure logs
  a warning and publishes the model without it, and tasks.plots is left out of the
  stages' CODE_VERSION so restyling a figure never retrains a model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.common import StageConfig, StageError, stage_logger
from tasks.progress import StageProgress

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")


class TrainSettings(StageConfig):
    """Budget, batch geometry and optimizer of one training run (model.trainer.TrainConfig)."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps; also the end of the cosine schedule.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget in minutes; training stops at whichever budget ends first. Empty: no limit.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per process per forward/backward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    block_size: int = Field(256, ge=8, description="Training sequence length in tokens (at most the model's block_size).")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate after warmup.")
    min_lr: float = Field(6e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled AdamW weight decay on matmul weights only.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables it.")
    eval_every: int = Field(100, ge=0, description="Validation-loss estimate every this many steps (0: only at the end).")
    eval_batches: int = Field(20, ge=1, description="Micro-batches per validation-loss estimate.")
    ckpt_every: int = Field(200, ge=0, description="Checkpoint every this many steps (0: only at the end); a killed run resumes from the latest.")
    log_every: int = Field(10, ge=1, description="Log loss, lr, tokens/s and MFU every this many steps.")
    seed: int = Field(1337, ge=0, description="Seed of initialization and data order.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="'auto': bf16 autocast on a bf16-capable GPU, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the training step (worth it on GPUs; a warm-up compile of a minute on CPU).")
    nproc: int | None = Field(None, ge=1, le=64, description="Processes (torchrun workers) on this host; empty: one per GPU, or 1 on CPU. 2 on CPU runs DDP over gloo.")

    def train_dict(self) -> dict:
        """The fields model.trainer.TrainConfig takes."""
        return self.model_dump(exclude={"nproc"})


def data_files(paths: list[Path], dtype: str) -> list[dict]:
    return [{"path": str(p), "dtype": dtype} for p in paths]


def train_in_child(stage: str, work: Path, spec: dict, nproc: int | None) -> Path:
    """Write the spec, run torchrun, return the final model dir the child published."""
    from model.launch import default_nproc, launch

    log = stage_logger(stage)
    final = work / "final"
    spec = {**spec, "out_dir": str(work / "checkpoints"), "artifact_dir": str(final)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    n = nproc or default_nproc()
    log.info("%s: launching torchrun with %d process(es); spec %s", stage, n, spec_path)
    progress = StageProgress(stage, f"{stage}: optimizer steps done")

    def on_line(line: str) -> None:
        # Logged from the task's own thread (launch reads the pipe there), so Prefect's
        # API handler finds the task run's context and files the line under it.
        log.info("%s", line)
        m = STEP_LINE.match(line)
        if m:
            progress.update(int(m.group(1)) / max(int(m.group(2)), 1))

    try:
        launch(spec_path, n, on_line=on_line)
    except RuntimeError as e:
        raise RuntimeError(f"[{stage}] {e}") from None
    progress.done()
    if not (final / "model.safetensors").exists():
        raise StageError(stage, str(final), "training finished without writing a model")
    return final


def copy_model_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def write_loss_plot(stage: str, metrics: Path, out: Path) -> Path | None:
    """Draw ``metrics.jsonl`` as ``out`` (PNG); None, with a warning, when it cannot."""
    from tasks.plots import plot_loss, read_loss_history

    try:
        return plot_loss(read_loss_history(metrics), out, title=f"{stage}: loss per optimizer step")
    except Exception as e:  # the model is the product; the picture is a convenience
        stage_logger(stage).warning("%s: no loss plot (%s: %s)", stage, type(e).__name__, e)
        return None


def training_counters(final: Path) -> dict:
    """The child's summary.json, trimmed to what the funnel and summary show."""
    summary = json.loads((final / "summary.json").read_text())
    keep = ("steps", "stopped_by", "tokens", "train_loss", "val_loss", "wall_s", "tokens_per_s", "params", "trainable_params", "world", "device")
    return {k: summary[k] for k in keep if k in summary}
