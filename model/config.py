"""The model's configs: its shape, how it trains, its LoRA adapters. One class per concept.

These are the classes the YAML profiles and the Prefect UI's forms validate (the pretrain
and finetune stage configs hold them as fields) and the ones the model and the trainer
run with: there is no second copy to drift. Each field's docstring is its description in
the UI (``use_attribute_docstrings``).

Design decisions:
- pydantic models, frozen, with unknown keys refused and ``inf``/``nan`` rejected, as every
  lmforge config (model/ imports nothing from tasks/, so the rules are restated here
  rather than inherited).
- Every cross-field rule is a validator here, so it runs when a profile or a form is
  loaded, before any stage starts, and again when a train spec is read by the torchrun
  child: ``min_lr <= lr``, ``warmup_steps <= max_steps``, ``n_embd`` divisible by
  ``n_head`` with an even head size (RoPE), LoRA targets that are Linear layers of the GPT.
- No torch here: importing a config costs milliseconds and works where torch is absent.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Names of the Linear layers inside each block of :class:`model.gpt.GPT` (LoRA's possible targets)."""


class _Config(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        return cls.model_validate(d)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


class GPTConfig(_Config):
    """Shape of the Llama-style decoder in :mod:`model.gpt`."""

    vocab_size: int | None = Field(None, ge=2)
    """Number of token ids. Leave it empty in a profile: the tokenizer's vocabulary size is used."""
    block_size: int = Field(256, ge=8, le=65536)
    """Longest sequence (prompt + cache) the model attends over, in tokens; RoPE tables cover it."""
    n_layer: int = Field(4, ge=1, le=256)
    """Transformer blocks."""
    n_head: int = Field(4, ge=1, le=256)
    """Attention heads; n_embd must divide by it, and the head size n_embd / n_head must be even (RoPE)."""
    n_embd: int = Field(256, ge=2, le=65536)
    """Residual stream width."""
    mlp_hidden: int = Field(0, ge=0)
    """SwiGLU hidden width; 0 means 8/3 * n_embd rounded up to a multiple of 64 (Llama)."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head (small vocabularies); export unties it for INT8."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention output and MLP output during training."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd / n_head = {self.n_embd // self.n_head} must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return ((8 * self.n_embd // 3) + 63) // 64 * 64


class TrainConfig(_Config):
    """How to train: budgets, batch geometry, optimizer, schedule, and bookkeeping cadence."""

    max_steps: int = Field(1000, ge=1)
    """Optimizer steps; also the end of the cosine schedule."""
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget of one run in minutes; training stops at whichever budget ends first. Empty: no limit."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per process per forward/backward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; tokens/step = micro_batch_size * grad_accum_steps * processes * block_size."""
    block_size: int = Field(256, ge=8)
    """Training sequence length in tokens; at most the model's block_size."""
    lr: float = Field(6e-4, gt=0, le=10)
    """Peak learning rate, reached at the end of warmup (nanoGPT's GPT-2 small value)."""
    min_lr: float = Field(6e-5, ge=0, le=10)
    """Learning rate at the end of the cosine decay (lr / 10, as in Chinchilla and nanoGPT); at most lr."""
    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from lr / warmup_steps to lr; 0 starts at lr; at most max_steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled AdamW weight decay on matmul weights only (never on norms or embeddings)."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    """AdamW (beta1, beta2), each in [0, 1); 0.95 for beta2 is the usual choice for LM pretraining."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_every: int = Field(100, ge=0)
    """Validation-loss estimate every this many steps (and at the end); 0: only at the end."""
    eval_batches: int = Field(20, ge=1)
    """Micro-batches per process in one validation-loss estimate (always the same windows)."""
    ckpt_every: int = Field(200, ge=0)
    """Checkpoint every this many steps (and always at the end); 0: only at the end. A killed run resumes from the latest."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted after each successful save."""
    log_every: int = Field(10, ge=1)
    """Log loss, learning rate, tokens/s and MFU every this many steps (and at the last step)."""
    seed: int = Field(1337, ge=0)
    """Seed of initialization, of the data order (with the step) and of each process's dropout (seed + rank)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 autocast on a bf16-capable GPU, fp32 otherwise; 'bf16': autocast anywhere; 'fp32'."""
    compile: bool = False
    """torch.compile the training step (fused kernels on GPUs; a warm-up compile of a minute on CPU)."""
    nproc: int | None = Field(None, ge=1, le=64)
    """Processes (torchrun workers) on this host; empty: one per GPU, or 1 on CPU. 2 on CPU runs DDP over gloo."""

    @model_validator(mode="after")
    def _schedule(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        return self


class LoRAConfig(_Config):
    """Which layers get low-rank adapters and how big they are (PEFT's and litgpt's knobs)."""

    r: int = Field(8, ge=1, le=1024)
    """Rank of the update B A; trainable parameters per layer are r * (in + out)."""
    alpha: float = Field(16.0, gt=0, le=1e6)
    """The update is scaled by alpha / r, so changing r keeps the update's size comparable."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during training (the base path is not dropped)."""
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Linear layers to adapt, among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""

    @model_validator(mode="after")
    def _known_targets(self) -> "LoRAConfig":
        unknown = sorted(set(self.targets) - set(LINEAR_LAYERS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}: choose among {', '.join(LINEAR_LAYERS)}")
        return self
