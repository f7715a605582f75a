"""The one training loop: pretraining and LoRA finetuning, one process or DDP under torchrun.

Design decisions:
- Exact resume. Everything a step depends on is either in the checkpoint (weights,
  AdamW moments, every rank's torch RNG) or a pure function of the step (the batch,
  see model.data; the learning rate, see model.optim). A run stopped anywhere and resumed
  from its latest checkpoint reproduces the uninterrupted run's losses and weights.
- ``out_dir`` is the run: checkpoints and ``metrics.jsonl`` live there, and a Trainer
  created on an ``out_dir`` that holds checkpoints resumes from the latest one. Rerunning
  a crashed or preempted job is just running it again.
- Two budgets, whichever ends first: ``max_steps`` (which also shapes the LR schedule) and
  ``max_minutes`` of wall time. Ranks agree on stopping through an all_reduce, so no
  rank waits forever in a collective the others have left.
- Gradient accumulation skips DDP's all-reduce on all but the last micro-step (no_sync).
- bf16 autocast on GPU, fp32 on CPU ("auto"); no fp16, hence no GradScaler to save.
- Logged on rank 0 every ``log_every`` steps: one JSON line in ``metrics.jsonl`` and one
  human line through ``log`` (stdout under torchrun, which the launcher streams on).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from model import distributed
from model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from model.config import TrainConfig
from model.data import TokenWindows
from model.flops import estimate_mfu, flops_per_token, matmul_params, peak_flops
from model.optim import configure_optimizer, get_lr
from storage.faults import pause_point


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``; None runs in fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


class Trainer:
    """Trains ``model`` on ``train_data`` into ``out_dir``, resuming from its latest checkpoint."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_data: TokenWindows,
        val_data: TokenWindows | None,
        out_dir: str | Path,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
    ):
        if cfg.block_size > model.config.block_size:
            raise ValueError(
                f"train block_size {cfg.block_size} exceeds the model's block_size {model.config.block_size}"
            )
        train_data.require(cfg.block_size)
        if val_data is not None:
            val_data.require(cfg.block_size)
        self.cfg, self.train_data, self.val_data = cfg, train_data, val_data
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._log = log if self.rank == 0 else (lambda _line: None)
        self.model = model.to(self.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.optimizer = configure_optimizer(self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), self.device.type)
        torch.manual_seed(cfg.seed + self.rank)
        self.step = 0
        self.resumed_from: int | None = None
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer)
            self.step = self.resumed_from = state["step"]
            changed = {k: v for k, v in cfg.to_dict().items() if state["train_config"].get(k) != v}
            self._log(f"resumed from {ckpt} at step {self.step}" + (f"; config changed: {changed}" if changed else ""))
        self.ddp = distributed.parallelize(self.model, self.device, compile=cfg.compile)
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * self.world * cfg.block_size
        self.flops_per_token = flops_per_token(model.config, cfg.block_size, matmul_params(model))
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _mean_over_ranks(self, t: torch.Tensor) -> float:
        return (distributed.all_reduce_sum(t.detach().float().clone()) / self.world).item()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step at ``self.step``: this rank's mean micro-batch loss and the grad norm."""
        cfg = self.cfg
        lr = get_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self.train_data.batch(self.step, micro, self.rank, self.world, cfg.micro_batch_size, cfg.block_size)
            x, y = self._to_device(x), self._to_device(y)
            last = micro == cfg.grad_accum_steps - 1
            # Only the last micro-step all-reduces gradients; the others accumulate locally.
            with nullcontext() if last or self.world == 1 else self.ddp.no_sync():
                with self._autocast():
                    _, loss = self.ddp(x, y)
                (loss / cfg.grad_accum_steps).backward()
            total += loss.detach()
        grad_norm = None
        if cfg.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / cfg.grad_accum_steps, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same ``eval_batches`` windows every time, averaged over ranks."""
        cfg = self.cfg
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for k in range(cfg.eval_batches):
            x, y = self.val_data.batch(k, 0, self.rank, self.world, cfg.micro_batch_size, cfg.block_size)
            with self._autocast():
                _, loss = self.model(self._to_device(x), self._to_device(y))
            total += loss.float()
        self.model.train()
        return self._mean_over_ranks(total / cfg.eval_batches)

    def _record(self, row: dict, line: str) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._log(line)

    def _out_of_time(self, started: float) -> bool:
        over = time.time() - started >= self.cfg.max_minutes * 60
        flag = torch.tensor(float(over), device=self.device)
        return distributed.all_reduce_max(flag).item() > 0

    def _save(self) -> None:
        save_checkpoint(
            self.out_dir, self.step, self.model, self.optimizer, self.cfg.to_dict(), self.cfg.keep_checkpoints
        )

    def fit(self) -> dict:
        """Train until a budget ends; checkpoint; return the run's summary."""
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._log(
            f"training {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable) on {self.world} x {self.device} "
            f"| {self.tokens_per_step:,} tokens/step | {self.amp_dtype or torch.float32} | steps {self.step}..{cfg.max_steps}"
        )
        self.model.train()
        started = time.time()
        first_step = self.step
        mark_time, mark_step = started, self.step
        saved_at = self.step if self.resumed_from is not None else None
        train_loss = val_loss = None
        loss_step = val_step = None
        stopped_by = "max_steps"
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                train_loss, loss_step = self._mean_over_ranks(loss), self.step
                now = time.time()
                tps = (self.step - mark_step) * self.tokens_per_step / max(now - mark_time, 1e-9)
                row = {
                    "step": self.step,
                    "loss": train_loss,
                    "lr": get_lr(self.step - 1, cfg),
                    "tokens_per_s": tps,
                    "tokens": self.step * self.tokens_per_step,
                    "elapsed_s": now - started,
                }
                line = (
                    f"step {self.step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {row['lr']:.2e} | {tps:,.0f} tok/s"
                )
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm.item()
                    line += f" | grad norm {row['grad_norm']:.3f}"
                if self.peak:
                    row["mfu"] = estimate_mfu(tps / self.world, self.flops_per_token, self.peak)
                    line += f" | mfu {row['mfu']:.1%}"
                self._record(row, line)
                mark_time, mark_step = time.time(), self.step
            if self.val_data is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                val_loss, val_step = self.evaluate(), self.step
                self._record({"step": self.step, "val_loss": val_loss}, f"step {self.step} | val loss {val_loss:.4f}")
                mark_time, mark_step = time.time(), self.step
            if cfg.max_minutes is not None and self._out_of_time(started):
                stopped_by = "max_minutes"
                break
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self._save()
                saved_at = self.step
                pause_point(os.environ.get("LMFORGE_STAGE", "train"))  # a kill -9 test stops here (storage/faults.py)
                mark_time, mark_step = time.time(), self.step
        if self.step > first_step and loss_step != self.step:  # stopped by the wall budget between log steps
            train_loss = self._mean_over_ranks(loss)
        if self.val_data is not None and val_step != self.step:
            val_loss = self.evaluate()
            self._record({"step": self.step, "val_loss": val_loss}, f"step {self.step} | val loss {val_loss:.4f}")
        if saved_at != self.step:
            self._save()
        wall = time.time() - started
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "resumed_from": self.resumed_from,
            "stopped_by": stopped_by,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "tokens": self.step * self.tokens_per_step,
            "wall_s": wall,
            "tokens_per_s": (self.step - first_step) * self.tokens_per_step / max(wall, 1e-9),
            "params": n_params,
            "trainable_params": n_train,
        }
        self._log(f"done: {json.dumps(summary)}")
        return summary
