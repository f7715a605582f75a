"""The tokenizer's training sample: which training-split documents, chosen by a hash of their id.

A BPE trainer holds the counts of every distinct pre-token of its text in one process, so
the tokenizer trains on a bounded sample: the training documents whose hash rank (of the
seed and the doc_id) falls in the lowest of ``BUCKETS`` buckets, as many buckets as fit
in ``max_train_chars`` characters together. The sample is spread over the whole artifact
(not its first files), is the same whatever its parts or the workers, and a rerun takes
the same documents. When the whole training split fits, every document is taken.

:func:`measure_part` is the per-part step (:mod:`tasks.parts`): the characters of the
part's training documents in each bucket; :func:`buckets_within` turns the parts' sums
into how many buckets fit; :func:`bucket_of` places one document.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BUCKETS = 4096


def bucket_of(doc_id: str, seed: int) -> int:
    """The document's rank bucket, uniform in [0, BUCKETS) and fixed by (seed, doc_id)."""
    h = hashlib.sha256(f"tokenizer-sample:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:4], "big") * BUCKETS >> 32


def measure_part(part, out: Path, seed: int, splits_of: Callable[[pa.RecordBatch], list[str]]) -> dict:
    """``chars``: characters of the part's training-split documents per rank bucket."""
    names = pq.read_schema(part.path).names
    columns = [c for c in ("doc_id", "text", "url", "augmented_from") if c in names]
    chars = np.zeros(BUCKETS, dtype=np.int64)
    for batch in pq.ParquetFile(part.path).iter_batches(columns=columns):
        train = np.array([s == "train" for s in splits_of(batch)], dtype=bool)
        if not train.any():
            continue
        lengths = pc.fill_null(pc.utf8_length(batch.column("text")), 0).to_numpy(zero_copy_only=False)
        ids = batch.column("doc_id").to_pylist()
        buckets = np.array([bucket_of(d, seed) for d in ids], dtype=np.int64)
        chars += np.bincount(buckets[train], weights=lengths[train], minlength=BUCKETS).astype(np.int64)
    return {"chars": chars.tolist()}


def buckets_within(chars: list[list[int]], budget: int) -> tuple[int, int, int]:
    """How many of the lowest buckets fit in ``budget`` characters together (``BUCKETS``: all
    of them), summed over the parts' :func:`measure_part` counts; the characters they hold;
    and the training split's characters."""
    per_bucket = np.sum(np.asarray(chars, dtype=np.int64).reshape(-1, BUCKETS), axis=0)
    cumulative = np.cumsum(per_bucket)
    n = int(np.searchsorted(cumulative, budget, side="right"))
    return n, int(cumulative[n - 1]) if n else 0, int(cumulative[-1])
