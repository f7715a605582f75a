"""Continuous batching: many generations share each forward pass; they join and leave between steps.

numpy only (no torch). The batcher schedules; a :class:`BatchCache` holds the running
rows' KV caches and steps the model over them. Two kinds: the serving graph's
:class:`model.onnx_generate.SlotCache` (one buffer per layer updated in place by
onnxruntime's ``GroupQueryAttention``, each row its own length: what ``lmforge serve``
runs on CPU), and :class:`PaddedCache` over any model with the exported ``model.onnx``'s
contract, ``lm(ids, past_k, past_v, past_mask) -> (logits, present_k, present_v)``: an
:class:`model.onnx_generate.OnnxLM`, or :class:`model.torch_lm.TorchLM` on a GPU (its caches
stay torch tensors on the device; :class:`CacheOps` is how they are joined and padded).

Design decisions (vLLM's and TGI's scheduling, in the small):
- One decode step runs every active sequence at once: one new token each, one graph call.
- A new request is prefilled alone (its whole prompt in one call, no padding) as the
  batch's new last row. A finished or cancelled sequence leaves between steps; the cache
  may move rows to fill the hole (:meth:`BatchCache.drop` says how), and the batcher's
  ``running`` list follows it.
- Prefills come first in each :meth:`ContinuousBatcher.step` (at most ``max_prefills``),
  then one decode step for everyone else: waiting requests start soon, and running ones
  never stall for more than a few prefills.
- Tokens are chosen per sequence by :func:`model.decoding.sample_token` with the
  sequence's own settings and ``np.random.default_rng(seed)``, and the rules for the
  window and stopping are :func:`model.decoding.decode`'s: a request alone, batched with
  others or not, gets the same tokens (tested at temperature 0 and with a seed).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from model.decoding import check_sampling, fit_prompt, sample_token


class CachedLM(Protocol):
    """A model stepped over explicit per-layer caches (the exported ``model.onnx``'s contract)."""

    def __call__(self, ids: np.ndarray, past_k: list, past_v: list, past_mask: np.ndarray) -> tuple[Any, list, list]:
        """Logits as a numpy array (B, T, V) and the present caches."""

    def empty_cache(self, batch: int) -> tuple[list, list]:
        """Zero-length caches (keys, values), one per layer."""


class BatchCache(Protocol):
    """The running batch's KV caches and the model step over them: row i is the batcher's ``running[i]``.

    Two implementations: :class:`PaddedCache` (any :class:`CachedLM`: caches returned by
    each step, rows left-padded to the longest) and :class:`model.onnx_generate.SlotCache`
    (the serving graph: one buffer per layer updated in place, each row its own length).
    """

    rows: int

    def add(self, ids: Sequence[int]) -> np.ndarray:
        """Prefill ``ids`` as a new last row; the logits (V,) of its last position."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One new token for every row (ids (rows, 1)); logits (rows, V)."""

    def drop(self, gone: list[int]) -> list[int]:
        """Free the rows ``gone``; returns the new row order as old row indices (the cache may move rows)."""


class CacheOps:
    """How :class:`PaddedCache` combines cache arrays (B, H, P, hd): numpy's; :mod:`model.torch_lm` has torch's."""

    @staticmethod
    def concat(arrays: list, axis: int):
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def left_pad(a, length: int):
        """``a`` with zeros before its sequence axis (2) up to ``length``."""
        return np.pad(a, [(0, 0), (0, 0), (length - a.shape[2], 0), (0, 0)]) if a.shape[2] < length else a


class PaddedCache:
    """A :class:`BatchCache` over a :class:`CachedLM` whose step returns new caches (``present = past + new``).

    The caches live in one batch array per layer ``(B, H, P, hd)``, **left-padded** to the
    longest history, with ``past_mask`` marking the padding; the graph's present cache is
    the next step's past as is. A new row is left-padded to the batch's length (or the
    batch to its length); dropped rows are removed and columns of padding that every row
    has are trimmed, so the batch's length follows its longest member, not its history.
    Every step copies the whole cache (the graph's concat): :class:`model.onnx_generate.SlotCache`
    does not, where a serving graph exists.
    """

    def __init__(self, lm: CachedLM, ops: CacheOps | None = None):
        self.lm, self.ops = lm, ops or CacheOps()
        self.rows = 0
        self._k = self._v = self._mask = None

    def add(self, ids: Sequence[int]) -> np.ndarray:
        batch = np.asarray([ids], dtype=np.int64)
        logits, k, v = self.lm(batch, *self.lm.empty_cache(1), np.zeros((1, 0), dtype=np.int64))
        mask = np.ones((1, k[0].shape[2]), dtype=np.int64)
        if self._k is None:
            self._k, self._v, self._mask = k, v, mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            pad, cat = self.ops.left_pad, self.ops.concat
            self._k = [cat([pad(a, length), pad(b, length)], 0) for a, b in zip(self._k, k)]
            self._v = [cat([pad(a, length), pad(b, length)], 0) for a, b in zip(self._v, v)]
            self._mask = np.concatenate([_left_pad_mask(self._mask, length), _left_pad_mask(mask, length)])
        self.rows += 1
        return logits[0, -1]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        logits, self._k, self._v = self.lm(ids, self._k, self._v, self._mask)
        self._mask = np.concatenate([self._mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
        return logits[:, -1]

    def drop(self, gone: list[int]) -> list[int]:
        gone_set = set(gone)
        keep = [i for i in range(self.rows) if i not in gone_set]
        self.rows = len(keep)
        if not keep:
            self._k = self._v = self._mask = None
            return keep
        self._mask = self._mask[keep]
        pad = int(np.argmax(self._mask.any(axis=0)))  # columns of padding every row has
        self._mask = self._mask[:, pad:]
        self._k = [a[keep][:, :, pad:] for a in self._k]
        self._v = [a[keep][:, :, pad:] for a in self._v]
        return keep


@dataclass
class GenerationRequest:
    """What to generate: the prompt's token ids and the sampling settings."""

    prompt_ids: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@dataclass
class Generation:
    """One request's progress: the tokens so far, and why it ended (``stop``, ``length``, ``cancelled``)."""

    id: int
    request: GenerationRequest
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    _feed: list[int] = field(default_factory=list, repr=False)
    _fed: int = 0
    _rng: np.random.Generator | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ContinuousBatcher:
    """Runs many generations through one ``step`` function, batching their decode steps.

    Not thread-safe: one thread calls :meth:`submit`, :meth:`cancel` and :meth:`step`
    (a server's engine loop). Each :meth:`step` returns ``(generation, new_token)`` pairs:
    a token of ``None`` means the generation ended in this step without a new token.
    """

    def __init__(
        self, cache: BatchCache, block_size: int, eot_id: int | None, max_batch: int = 16, max_prefills: int = 2
    ):
        self.cache, self.block_size, self.eot_id = cache, block_size, eot_id
        self.max_batch, self.max_prefills = max_batch, max_prefills
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []  # row i of the batch cache is running[i]
        self._ids = itertools.count()

    # --- the queue ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Generation:
        gen = Generation(next(self._ids), request)
        gen._feed = fit_prompt(request.prompt_ids, self.block_size, request.max_new_tokens)
        gen.prompt_tokens = len(gen._feed)
        gen._rng = np.random.default_rng(request.seed)
        if request.max_new_tokens == 0:
            gen.finish_reason = "length"
        else:
            self.waiting.append(gen)
        return gen

    def cancel(self, gen: Generation) -> None:
        """End ``gen`` now (a client that went away); its batch row is freed at the next step."""
        if not gen.done:
            gen.finish_reason = "cancelled"

    @property
    def active(self) -> int:
        return len(self.waiting) + len(self.running)

    # --- one scheduler iteration ----------------------------------------------------------

    def step(self) -> list[tuple[Generation, int | None]]:
        """Prefill up to ``max_prefills`` waiting requests, then one decode step for the batch."""
        events: list[tuple[Generation, int | None]] = [(g, None) for g in self.running if g.done]  # cancelled
        events += [(g, None) for g in self.waiting if g.done]
        self.waiting = deque(g for g in self.waiting if not g.done)
        self._drop_finished()
        started = 0
        while self.waiting and started < self.max_prefills and len(self.running) < self.max_batch:
            events.append(self._prefill(self.waiting.popleft()))
            started += 1
        self._drop_finished()  # a prompt whose first token ended it
        if self.running:
            events += self._decode()
        self._drop_finished()
        return events

    def _prefill(self, gen: Generation) -> tuple[Generation, int | None]:
        logits = self.cache.add(gen._feed)
        self.running.append(gen)
        gen._fed += len(gen._feed)
        return gen, self._choose(gen, logits)

    def _decode(self) -> list[tuple[Generation, int | None]]:
        ids = np.asarray([[g._feed[-1]] for g in self.running], dtype=np.int64)
        logits = self.cache.decode(ids)
        # Greedy rows (the common case) take one argmax over the whole batch, not one call per row:
        # sample_token's argmax, row by row, cost more Python than the step's other bookkeeping.
        greedy = logits.argmax(axis=1).tolist()
        events = []
        for row, gen in enumerate(self.running):
            gen._fed += 1
            token = greedy[row] if gen.request.temperature == 0 else None
            events.append((gen, self._choose(gen, logits[row], token)))
        return events

    def _choose(self, gen: Generation, logits: np.ndarray, token: int | None = None) -> int | None:
        """The next token of ``gen`` (None when it stops here), by :func:`model.decoding.decode`'s rules.

        ``token`` is the row's greedy choice when the caller has it already (temperature 0).
        """
        r = gen.request
        if token is None:
            token = sample_token(logits, r.temperature, r.top_k, r.top_p, gen._rng)
        if token == self.eot_id or token in r.stop_ids:
            gen.finish_reason = "stop"
            return None
        gen.tokens.append(token)
        gen._feed = [token]
        if len(gen.tokens) >= r.max_new_tokens or gen._fed + 1 > self.block_size:
            gen.finish_reason = "length"
        return token

    def _drop_finished(self) -> None:
        gone = [i for i, g in enumerate(self.running) if g.done]
        if gone:
            self.running = [self.running[i] for i in self.cache.drop(gone)]


def _left_pad_mask(mask: np.ndarray, length: int) -> np.ndarray:
    return np.pad(mask, [(0, 0), (length - mask.shape[1], 0)])
