"""A small Llama-style decoder: RoPE, RMSNorm (pre-norm), SwiGLU, no biases, SDPA, KV cache.

Design decisions:
- Linear layers carry Llama's names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
  down_proj) so LoRA targets and a later HF-Llama weight mapping read naturally.
- The KV cache is explicit tensors, stacked over layers as ``(L, B, H, P, hd)``: the same
  signature is exported to ONNX, so torch and onnxruntime generation share one contract.
- With a cache the query is shorter than the keys, and SDPA's ``is_causal`` is top-left
  aligned (wrong there), so the cached path passes an explicit bottom-right causal mask.
  Without a cache (training) ``is_causal=True`` keeps the fast fused kernels.
- RoPE angles are computed from positions in-graph, so exported models need no tables
  as inputs and any past length up to ``block_size`` works.
- Rows of one batch may hold different amounts of history (continuous batching):
  ``past_mask (B, P)`` marks which cached positions are real (1) or left padding (0). A
  row's new tokens take positions after its real past, and attend to its real past and
  to themselves causally. Left padding is the only layout: a row's real history is the
  right end of the cache, so the new tokens' keys land right after it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (*positions.shape, head_dim/2) for integer positions (computed, not looked up)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, hd) by the position angles."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.n_embd
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask=None, past_k=None, past_v=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        drop = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y), k, v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, past_k=None, past_v=None):
        a, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x, k, v


class GPT(nn.Module):
    """The decoder. ``forward`` for training/eval, ``forward_cached`` for generation and export."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is not set: give it the tokenizer's vocabulary size")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # Residual projections scaled down by depth (GPT-2 / nanoGPT) keep early activations tame.
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameter count; the embedding is excluded by default (it costs no matmul FLOPs when tied)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100):
        """Logits (B, T, V) and, with targets, the mean cross-entropy over non-ignored targets."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = rope_angles(torch.arange(T, device=idx.device), self.config.head_dim, self.config.rope_theta)
        x = self.tok_emb(idx)
        for blk in self.blocks:
            x, _, _ = blk(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
            )
        return logits, loss

    def forward_cached(
        self, idx: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_mask: torch.Tensor | None = None
    ):
        """One step of incremental decoding.

        idx (B, T); past_k/past_v one (B, H, P, hd) tensor per layer (a list, or a tensor
        whose first axis is the layer), P >= 0; ``past_mask`` (B, P), 1 where the cache holds
        a real token and 0 for left padding (None: all real). Returns logits (B, T, V) and
        the present caches as lists of (B, H, P+T, hd), one per layer. A row's positions
        continue from its number of real past tokens.

        Per-layer caches, not one stacked tensor: stacking and slicing copy the whole cache
        every step, which cost the exported graph about 30% of a batched decode step.
        """
        B, T = idx.shape
        P = past_k[0].shape[2]
        steps = torch.arange(T, device=idx.device)
        keys = torch.arange(P + T, device=idx.device)
        # Bottom-right causal: new token i sits at cache index P+i and sees keys 0..P+i.
        causal = keys[None, :] <= (steps + P)[:, None]  # (T, P+T)
        if past_mask is None:
            pos, mask = steps + P, causal
        else:
            real = past_mask.to(torch.bool)
            pos = real.sum(dim=1, keepdim=True) + steps[None, :]  # (B, T)
            keep = torch.cat([real, torch.ones(B, T, dtype=torch.bool, device=idx.device)], dim=1)
            mask = (causal[None, :, :] & keep[:, None, :])[:, None]  # (B, 1, T, P+T)
        cos, sin = rope_angles(pos, self.config.head_dim, self.config.rope_theta)
        if past_mask is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2): per row, broadcast over heads
        x = self.tok_emb(idx)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, cos, sin, mask, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        logits = self.lm_head(self.norm(x))
        return logits, ks, vs

    def empty_cache(self, batch: int, device=None, dtype=torch.float32) -> tuple[list, list]:
        """Zero-length per-layer caches (keys, values) to start generation with."""
        c = self.config
        shape = (batch, c.n_head, 0, c.head_dim)
        return tuple([torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)] for _ in range(2))
