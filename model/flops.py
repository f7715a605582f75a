"""Training FLOPs per token and model FLOPs utilisation (MFU).

The formula is PaLM's (Chowdhery et al. 2022, appendix B), as nanoGPT's ``estimate_mfu``
and torchtitan use it::

    flops_per_token = 6 * N  +  12 * L * H * Q * T

- ``6 * N``: every matmul weight costs 2 FLOPs per token (multiply + add) in the forward
  pass and 4 in the backward pass (gradients w.r.t. the input and w.r.t. the weight).
  N counts the weights that are multiplied: all parameters except the embedding lookup,
  which is a gather; with tied embeddings the same matrix *is* the LM head, so it counts.
- ``12 * L * H * Q * T``: attention's two matmuls per layer (Q K^T and A V), each
  ``2 * H * Q * T`` FLOPs per token in the forward pass, times 3 for forward + backward.
  L layers, H heads, Q head dimension, T the training sequence length.
- Not counted: norms, softmax, rotary, the loss (small), activation recomputation (it is
  not useful work), and causal sparsity (kernels skip the masked half; the convention
  counts it anyway, so MFU figures stay comparable with nanoGPT's and PaLM's).

MFU divides achieved FLOPs by the device's *dense* bf16 peak. A hardcoded peak misleads
both ways (nanoGPT#464 showed 104% on an H100 with the A100 peak), so the peak is looked
up by device name and an unknown device gets no MFU rather than a wrong one.
"""

from __future__ import annotations

from model.config import GPTConfig

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets
# as collected in torchtitan's get_peak_flops. Matched in order, case-insensitively, on the
# name torch.cuda.get_device_name() reports: more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI325X", 1300e12),
    ("MI300X", 1300e12),
    ("MI250X", 191.5e12),
)


def flops_per_token(cfg: GPTConfig, seq_len: int, n_matmul_params: int) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring for each factor."""
    return 6 * n_matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def matmul_params(model) -> int:
    """N of the formula: the GPT's parameters minus the embedding gather, plus it again when tied."""
    tied = model.config.tie_embeddings
    return model.num_params(exclude_embedding=not tied)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by name, or None when unknown."""
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return peak
    return None


def estimate_mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak: float) -> float:
    """Achieved FLOP/s over the peak, as a fraction."""
    return tokens_per_s_per_device * flops_per_tok / peak
