"""The decoding loop shared by torch and onnxruntime generation: window, sampling, stopping.

numpy only (no torch): :mod:`model.onnx_generate` must run without torch. Both backends
plug a ``step`` function (feed these ids, keep the KV cache, return the last logits)
into :func:`decode`, so a seeded run picks the same tokens from the same logits in both,
and ONNX generation is checked against torch token for token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Reject impossible settings before any model work."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a logits vector (V,): greedy at temperature 0, else top-k, then top-p (nucleus)."""
    if temperature == 0:  # float32 to float64 is exact: the same argmax, without the copy
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64)
    z = z / temperature
    if 0 < top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        # The smallest prefix whose mass reaches top_p; the most likely token always stays.
        n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        kept = np.zeros_like(p)
        kept[order[:n_keep]] = p[order[:n_keep]]
        p = kept / kept.sum()
    return int(rng.choice(len(p), p=p))


def fit_prompt(prompt_ids: Sequence[int], block_size: int, max_new_tokens: int) -> list[int]:
    """The prompt, left-truncated so that min(max_new_tokens, block_size // 2) new tokens fit.

    Generation feeds at most ``block_size`` tokens (prompt + generated, the last generated
    token is never fed), so a prompt of n tokens leaves room for ``block_size - n + 1``.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("the prompt must hold at least one token (start it with the end-of-text id)")
    room = min(max_new_tokens, block_size // 2)
    keep = max(1, min(block_size, block_size - room + 1))
    return ids[-keep:]


def decode(
    step: Callable[[list[int]], np.ndarray],
    prompt_ids: Sequence[int],
    block_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eot_id: int | None,
    seed: int,
) -> list[int]:
    """New token ids (without the stop token) from ``step(ids) -> logits (V,) of the last id``.

    The first call feeds the (fitted) prompt, each later call the one token just chosen;
    ``step`` appends them to its KV cache. Stops after ``max_new_tokens``, at ``eot_id``,
    or when feeding the next token would pass ``block_size``.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    feed = fit_prompt(prompt_ids, block_size, max_new_tokens)
    rng = np.random.default_rng(seed)
    fed, out = 0, []
    while len(out) < max_new_tokens and fed + len(feed) <= block_size:
        logits = step(feed)
        fed += len(feed)
        tok = sample_token(logits, temperature, top_k, top_p, rng)
        if tok == eot_id:
            break
        out.append(tok)
        feed = [tok]
    return out
