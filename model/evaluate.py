"""Held-out scoring: loss, perplexity and bits per byte, overall and per group (e.g. language).

Design decisions:
- Bits per byte, ``sum(nats) / (ln 2 * sum(UTF-8 bytes))``, is the headline number
  (nanochat's ``evaluate_bpb``, lm-eval's ``bits_per_byte``): unlike loss per token it
  does not change with the tokenizer, so models with different vocabularies compare.
- Every token a document lists is scored exactly once; nothing is masked. Pass the
  document as the token shards store it (text tokens, then the end-of-text id) and the
  model is also charged for predicting where the document ends, which is part of
  modelling it; its bytes are the text's UTF-8 bytes.
- The first token of a document is conditioned on the end-of-text id, which is what
  precedes it in training (documents are packed back to back, each ending with EOT).
- A long document is cut into disjoint windows of ``block_size`` targets (lm-eval's
  ``get_rolling_token_windows`` with ``context_len=1``): each window restarts its
  context, so perplexity is slightly pessimistic next to a sliding window (HF measured
  19.4 vs 16.5 for gpt2-large), at 1/stride of the cost.
- The windowing and the sums are one code path for every backend: the torch model,
  and any ``logits_fn(ids) -> logits`` (the ONNX fp32 and INT8 graphs), so the release
  gate compares like with like.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@dataclass(frozen=True)
class EvalDoc:
    """One held-out document: its token ids (scored), its text's UTF-8 size, and its group."""

    tokens: np.ndarray
    n_bytes: int
    group: str = "all"

    def __post_init__(self) -> None:
        if self.n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {self.n_bytes}")


NllFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(inputs (B, T) int64, targets (B, T) int64) -> nats (B, T) float64 per target."""


def _windows(docs: Sequence[EvalDoc], eot_id: int, block_size: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(doc index, inputs, targets) for disjoint windows covering every token of every doc once."""
    out = []
    for i, d in enumerate(docs):
        toks = np.asarray(d.tokens, dtype=np.int64)
        seq = np.concatenate(([eot_id], toks))
        for s in range(0, len(toks), block_size):
            targets = seq[s + 1 : s + 1 + block_size]
            out.append((i, seq[s : s + len(targets)], targets))
    return out


def _summary(nats: float, tokens: int, n_bytes: int, documents: int) -> dict:
    """Loss and perplexity per token; bits per byte is None for a group of zero bytes."""
    loss = float(nats) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": float(nats) / (LN2 * n_bytes) if n_bytes else None,
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": documents,
    }


def score_documents(nll_fn: NllFn, docs: Sequence[EvalDoc], eot_id: int, block_size: int, batch_size: int) -> dict:
    """Score ``docs`` with any per-token NLL function; returns the overall and per-group summary.

    Windows are sorted by length and right-padded to the longest in their batch: with a
    causal model the padding never influences the scored positions.
    """
    if block_size < 1 or batch_size < 1:
        raise ValueError("block_size and batch_size must be >= 1")
    windows = sorted(_windows(docs, eot_id, block_size), key=lambda w: len(w[1]))
    if not windows:
        raise ValueError("no tokens to score: every document is empty")
    doc_nats = np.zeros(len(docs), dtype=np.float64)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = max(len(w[1]) for w in batch)
        x = np.zeros((len(batch), width), dtype=np.int64)
        y = np.zeros((len(batch), width), dtype=np.int64)
        for r, (_, xi, yi) in enumerate(batch):
            x[r, : len(xi)], y[r, : len(yi)] = xi, yi
        nats = nll_fn(x, y)
        for r, (i, xi, _) in enumerate(batch):
            doc_nats[i] += float(nats[r, : len(xi)].sum())
    return _aggregate(docs, doc_nats)


def _aggregate(docs: Sequence[EvalDoc], doc_nats: np.ndarray) -> dict:
    """Sums per group and overall (nats, tokens, bytes, documents); empty documents count nowhere."""
    total = np.zeros(4)
    groups: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4))
    for d, nats in zip(docs, doc_nats):
        if len(d.tokens):
            row = np.array([nats, len(d.tokens), d.n_bytes, 1])
            total += row
            groups[d.group] += row
    out = _summary(total[0], *map(int, total[1:]))
    out["by_group"] = {k: _summary(v[0], *map(int, v[1:])) for k, v in sorted(groups.items())}
    return out


def logits_nll(logits_fn: Callable[[np.ndarray], np.ndarray]) -> NllFn:
    """Per-token NLL from a numpy ``logits_fn(ids (B, T)) -> logits (B, T, V)`` (e.g. onnxruntime)."""

    def nll(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits_fn(x), dtype=np.float32)
        m = logits.max(axis=-1, keepdims=True)
        lse = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64))
        return lse - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]

    return nll


def torch_nll(model: torch.nn.Module, device: str | torch.device) -> NllFn:
    """Per-token NLL of a :class:`model.gpt.GPT` (its ``forward``, no cache), in fp32."""

    @torch.no_grad()
    def nll(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        logits, _ = model(torch.from_numpy(x).to(device))
        t = torch.from_numpy(y).to(device)
        out = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none")
        return out.view(t.shape).double().cpu().numpy()

    return nll


def evaluate_documents(
    model: torch.nn.Module,
    docs: Sequence[EvalDoc],
    eot_id: int,
    block_size: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on ``docs``, overall and by group.

    ``block_size`` defaults to the model's, ``device`` to where its weights are. The model
    is put in eval mode and restored.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return score_documents(
            torch_nll(model, device), docs, eot_id, block_size or model.config.block_size, batch_size
        )
    finally:
        model.train(was_training)


def evaluate_logits_fn(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    docs: Sequence[EvalDoc],
    eot_id: int,
    block_size: int,
    batch_size: int = 8,
) -> dict:
    """:func:`evaluate_documents` for any backend that maps ids (B, T) to logits (B, T, V)."""
    return score_documents(logits_nll(logits_fn), docs, eot_id, block_size, batch_size)


def unigram_bits_per_byte(docs: Iterable[EvalDoc], counts: np.ndarray | None = None) -> float:
    """Bits per byte of a unigram model on the same tokens: the floor a language model must beat.

    With ``counts`` (training token counts, length = vocabulary) it is a real baseline,
    add-one smoothed so an unseen token costs finitely. Without, the distribution is the
    documents' own token frequencies, i.e. their unigram entropy: the best any unigram
    model could do on them, so a model that beats it has learnt context.
    """
    docs = list(docs)
    toks = np.concatenate([np.asarray(d.tokens, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    n_bytes = sum(d.n_bytes for d in docs)
    if not len(toks) or not n_bytes:
        raise ValueError("unigram_bits_per_byte needs documents with tokens and bytes")
    if counts is None:
        c = np.bincount(toks).astype(np.float64)
    else:
        c = np.asarray(counts, dtype=np.float64) + 1.0
        if toks.max() >= len(c):
            raise ValueError(f"token id {int(toks.max())} is outside counts of length {len(c)}")
    bits = -np.log2(c[toks] / c.sum()).sum()
    return float(bits / n_bytes)
