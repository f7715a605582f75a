"""The training loss curve: read a Trainer's ``metrics.jsonl`` and draw it as a PNG.

Design decisions:
- ``metrics.jsonl`` (model.trainer) holds two kinds of rows: ``{"step", "loss", "lr",
  "tokens", ...}`` every ``log_every`` steps and ``{"step", "val_loss"}`` at each
  evaluation. A run that was killed and resumed from a checkpoint logs the replayed
  steps again; the last row of a step wins, because it belongs to the run that finished.
- matplotlib with the Agg backend (no display), set on a Figure object rather than the
  global pyplot state, so plotting is safe in a worker thread and leaves no global state.
- No Prefect here: the stages write the PNG into their artifact, and flows/artifacts.py
  turns the same history into Prefect artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LossHistory:
    """Per-step training rows and validation losses, sorted by step."""

    train: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "tokens", ...}
    val: dict[int, float] = field(default_factory=dict)  # step -> val_loss

    def rows(self) -> list[dict]:
        """One row per logged step: step, train loss, val loss (where evaluated), lr, tokens."""
        by_step: dict[int, dict] = {}
        for r in self.train:
            by_step[r["step"]] = {
                "step": r["step"],
                "train_loss": r.get("loss"),
                "val_loss": None,
                "lr": r.get("lr"),
                "tokens": r.get("tokens"),
            }
        for step, v in self.val.items():
            by_step.setdefault(step, {"step": step, "train_loss": None, "val_loss": None, "lr": None, "tokens": None})[
                "val_loss"
            ] = v
        return [by_step[s] for s in sorted(by_step)]


def read_loss_history(path: Path) -> LossHistory:
    """Parse ``metrics.jsonl``; unreadable lines (a run killed mid-write) are skipped."""
    train: dict[int, dict] = {}
    val: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if "loss" in row:
            train[step] = row
        if "val_loss" in row:
            val[step] = float(row["val_loss"])
    return LossHistory(train=[train[s] for s in sorted(train)], val=dict(sorted(val.items())))


def thin(rows: list, max_rows: int) -> list:
    """At most ``max_rows`` rows, evenly spaced over the run, always keeping the first and last."""
    if len(rows) <= max_rows:
        return list(rows)
    if max_rows < 2:
        return rows[-max_rows:] if max_rows > 0 else []
    idx = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
    return [rows[i] for i in idx]


def plot_loss(history: LossHistory, out: Path, title: str) -> Path:
    """Write train (line) and validation (markers) loss against step as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if history.train:
        ax.plot(
            [r["step"] for r in history.train],
            [r["loss"] for r in history.train],
            label="train loss",
            color="tab:blue",
            linewidth=1.5,
        )
    if history.val:
        ax.plot(
            list(history.val),
            list(history.val.values()),
            label="validation loss",
            color="tab:orange",
            marker="o",
            linewidth=1.2,
        )
    ax.set_xlabel("optimizer step", fontsize=11)
    ax.set_ylabel("cross-entropy loss (nats/token)", fontsize=11)
    ax.set_title(title, fontsize=13)
    ax.grid(True, alpha=0.3)
    if history.train or history.val:
        ax.legend(fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png")
    return out
