"""The model's shape, as a frozen dataclass that travels inside every checkpoint and export."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the Llama-style decoder in :mod:`model.gpt`."""

    vocab_size: int
    """Number of token ids; the tokenizer's vocabulary size."""
    block_size: int = 256
    """Longest sequence (prompt + cache) the model attends over; RoPE tables cover it."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads; head size is n_embd // n_head."""
    n_embd: int = 256
    """Residual stream width."""
    mlp_hidden: int = 0
    """SwiGLU hidden width; 0 means 8/3 * n_embd rounded up to a multiple of 64 (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head (small vocabularies); export unties it."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output during training."""

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size must be even for RoPE")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return ((8 * self.n_embd // 3) + 63) // 64 * 64

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "GPTConfig":
        return cls.from_dict(json.loads(s))
