"""Generation with torch on a GPU (or CPU): the serving engine's second backend, beside onnxruntime.

:class:`TorchLM` gives the continuous batcher (:mod:`model.batching`) the exported graph's
contract on the GPT itself: ``lm(ids, past_k, past_v, past_mask) -> (logits, present_k,
present_v)`` with one cache tensor per layer, and ``empty_cache``. It loads the export
directory's Hugging Face weights (``hf/``, :func:`model.hf.load_hf`), so one release
directory serves on either backend.

Design decisions:
- The KV caches stay torch tensors on the device between steps (:class:`TorchCacheOps`
  joins, pads and drops their rows); only token ids and the mask go in, and only the last
  position's logits come out as numpy, which is all generation reads.
- bf16 on CUDA by default (what the GPU's tensor cores run; the GPT was trained with bf16
  autocast there), fp32 on CPU. Precision is the weights' and caches' dtype; logits are
  returned as fp32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.gpt import GPT
from model.hf import load_hf
from model.onnx_generate import ExportedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchCacheOps:
    """:class:`model.batching.CacheOps` for torch tensors (B, H, P, hd), on whatever device they live."""

    @staticmethod
    def concat(arrays: list, axis: int) -> torch.Tensor:
        return torch.cat(arrays, dim=axis)

    @staticmethod
    def left_pad(a: torch.Tensor, length: int) -> torch.Tensor:
        return F.pad(a, (0, 0, length - a.shape[2], 0)) if a.shape[2] < length else a


class TorchLM:
    """A GPT on ``device`` in ``dtype``, stepped the way the batcher steps an exported graph."""

    ops = TorchCacheOps()

    def __init__(self, model: GPT, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.precision = next(name for name, d in DTYPES.items() if d == dtype)
        self.model = model.to(device=self.device, dtype=dtype).eval()

    @classmethod
    def from_export(cls, export: ExportedModel, device: str = "cpu", precision: str | None = None) -> "TorchLM":
        """The export directory's ``hf/`` weights, with the context its ``export.json`` gives."""
        precision = precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")
        if precision not in DTYPES:
            raise ValueError(f"the torch backend runs in {sorted(DTYPES)}, got precision {precision!r}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine")
        gpt = load_hf(export.dir / "hf", block_size=export.block_size)
        return cls(gpt, device, DTYPES[precision])

    def empty_cache(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.model.empty_cache(batch, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def __call__(
        self, ids: np.ndarray, past_k: list, past_v: list, past_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[torch.Tensor], list[torch.Tensor]]:
        """Last-position logits (B, 1, V) as fp32 numpy, and the present caches (tensors on the device)."""
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        mask = None if past_mask is None else torch.from_numpy(np.ascontiguousarray(past_mask)).to(self.device)
        logits, ks, vs = self.model.forward_cached(x, past_k, past_v, mask)
        return logits[:, -1:].float().cpu().numpy(), ks, vs
