"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule.

Design decisions:
- Weight decay applies to >= 2-D weights (the matmuls) and never to norms or embeddings
  (nanoGPT, litgpt): decaying a norm's gain or a rarely seen token's row only hurts.
  A tied LM head *is* the embedding, so it is not decayed either. Frozen parameters
  (LoRA's base) are left out of the optimizer entirely.
- The schedule is a pure function of the step (nanoGPT's ``get_lr``): resuming needs no
  scheduler state, only the step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import TrainConfig


def configure_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused kernels on CUDA."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, other = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup reaching ``cfg.lr`` at step ``warmup_steps - 1``, then a cosine from
    ``cfg.lr`` at step ``warmup_steps`` down to ``cfg.min_lr`` at step ``max_steps``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)
