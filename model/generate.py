"""Text generation with the torch model and its KV cache.

The prompt is fed once (prefill), then one token per step through ``forward_cached``,
the same contract the ONNX export has; the loop, sampling and stopping rules are
:func:`model.decoding.decode`, shared with :mod:`model.onnx_generate`, so greedy and
seeded sampling give the same tokens from the same logits on both backends.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from model.decoding import decode


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eot_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """New token ids after ``prompt_ids`` (without the stop token).

    Stops after ``max_new_tokens``, at ``eot_id``, or when the context window
    (``block_size`` fed tokens) is full; a long prompt is left-truncated by
    :func:`model.decoding.fit_prompt`. ``temperature=0`` is greedy; ``top_k=0`` and
    ``top_p=1`` switch those filters off. The model is put in eval mode and restored.
    """
    param = next(model.parameters())
    cache = list(model.empty_cache(1, device=param.device, dtype=param.dtype))

    def step(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.long, device=param.device)
        logits, cache[0], cache[1] = model.forward_cached(x, cache[0], cache[1])
        return logits[0, -1].float().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        return decode(
            step, prompt_ids, model.config.block_size, max_new_tokens, temperature, top_k, top_p, eot_id, seed
        )
    finally:
        model.train(was_training)
