"""LoRA (Hu et al. 2021): low-rank adapters on chosen Linear layers, and merging them away.

Design decisions:
- ``y = W x + (B A dropout(x)) * alpha / r`` with A ``kaiming_uniform_(a=sqrt(5))`` and
  **B = 0**, so an adapted model starts as exactly the base model (PEFT's default init).
- Targets are module names; the default ``("q_proj", "v_proj")`` is PEFT's and litgpt's
  for Llama. Defaults r=8, alpha=16, dropout=0.05 are litgpt's finetune recipe.
- Everything but the adapters is frozen, so the optimizer and DDP see only A and B.
- :func:`merge_lora` folds ``B A * scale`` into W in fp32 (bf16 merges drift: peft#1388)
  and puts the plain Linear back: the merged model is an ordinary GPT with an ordinary
  state dict, which checkpoints, evaluation and ONNX export take as is. Merging a model
  without adapters changes nothing, so merging is idempotent.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + B A * scale, computed in fp32 and cast back to W's dtype."""
        w = self.base.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (w.float() + delta).to(w.dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(
    model: nn.Module,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
) -> nn.Module:
    """Wrap every Linear whose own name is in ``targets``; freeze all other parameters. In place."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets
    ]
    if not found:
        raise ValueError(f"no Linear module named any of {list(targets)} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found:
        _replace(model, name, LoRALinear(m, r, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it; unfreeze all parameters. In place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight.copy_(m.merged_weight())
            _replace(model, name, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (``...q_proj.lora_A`` / ``lora_B``): what a finetune must ship besides the base."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into a model already wrapped by :func:`apply_lora`."""
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA state does not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=False)
