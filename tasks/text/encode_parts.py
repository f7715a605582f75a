"""The shards stage's per-part step: tokenize one part of the documents in a worker.

This module imports tokenizers and pyarrow, nothing of the store or Prefect (a worker
starts in half a second, not three). What the step needs of the store comes in as
arguments: the tokenizer file, and as functions each row's split (``splits_of``), the
token layout (``flatten``, :func:`storage.tokens.flatten` with the end-of-text id and the
vocabulary) and a shard writer for a folder and a split (``shard_writer``,
:class:`storage.tokens.TokenShardWriter` with the vocabulary and the shard size).

Per part it writes, in artifact order:
- the part's own token shards, ``tokens-<split>-NNNNN.bin/.idx`` numbered from 0 in the
  part: the ids of its kept documents of that split, back to back, each followed by the
  end-of-text id (the layout of :mod:`storage.tokens`). :mod:`tasks.shards` links them
  into the artifact under their numbers there: no token is copied after this step;
- ``kept.parquet``: one row per kept document, in the part's order: the metadata columns
  read, ``split``, ``n_tokens`` (with the end-of-text id), ``n_bytes`` of the text, and
  where its tokens are: ``shard`` (the part's shard name) and ``start``.

A document is dropped (and counted) when its text is empty (``empty_text``), or when it
is a paraphrase of a held-out document (``augmented_from_val``): validation holds only
original text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from tasks.text.tally import part_funnel, sum_funnels

SPLITS = ("train", "val")
KEPT = "kept.parquet"
_loaded: dict[str, Tokenizer] = {}  # per process: one load per tokenizer file, not one per part


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A trained tokenizer that reads ``<|endoftext|>`` in text as text.

    ``encode_special_tokens`` is not saved in ``tokenizer.json``, so it is set here: a web
    page or a prompt that contains the literal string must not end a document.
    """
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def drop_reasons(texts: list[str | None], splits: list[str], sources: list[str | None]) -> list[str | None]:
    """Why each row is not tokenized (None: it is)."""
    return [
        "empty_text" if not text else "augmented_from_val" if src and s == "val" else None
        for text, s, src in zip(texts, splits, sources)
    ]


def encode_part(
    part,
    out: Path,
    tokenizer_file: str,
    splits_of: Callable[[pa.RecordBatch], list[str]],
    flatten: Callable[[list[list[int]]], tuple[np.ndarray, np.ndarray]],
    shard_writer: Callable[[Path, str], Any],
    read: list[str],
    batch_size: int,
) -> dict:
    """Tokenize the part's documents into ``out`` (see the module docstring).

    Returns its funnel, its kept count and its shards: ``{split: [[bin, idx, docs], ...]}``.
    """
    tok = _loaded.get(tokenizer_file)
    if tok is None:
        tok = _loaded[tokenizer_file] = load_tokenizer_file(tokenizer_file)
    metadata = [c for c in read if c != "text"]
    funnels, writer = [], None
    shards = {s: shard_writer(out, s) for s in SPLITS}
    try:
        for batch in pq.ParquetFile(part.path).iter_batches(batch_size=batch_size, columns=read):
            splits, texts = splits_of(batch), batch.column("text").to_pylist()
            names = batch.schema.names
            sources = batch.column("augmented_from").to_pylist() if "augmented_from" in names else [None] * len(texts)
            reasons = drop_reasons(texts, splits, sources)
            funnels.append(part_funnel(texts, reasons))
            keep = [r is None for r in reasons]
            if not any(keep):
                continue
            kept_splits = [s for s, k in zip(splits, keep) if k]
            mask = pa.array(keep)
            encodings = tok.encode_batch_fast([t for t, k in zip(texts, keep) if k], add_special_tokens=False)
            shard, start = [""] * len(encodings), [0] * len(encodings)
            for s in SPLITS:
                rows = [i for i, x in enumerate(kept_splits) if x == s]
                if rows:
                    placed = shards[s].add_flat(*flatten([encodings[i].ids for i in rows]))
                    for i, (name, at, _) in zip(rows, placed):
                        shard[i], start[i] = name, at
            kept = batch.select(metadata).filter(mask)
            table = pa.Table.from_batches([kept]).append_column("split", pa.array(kept_splits, pa.string()))
            table = table.append_column("n_tokens", pa.array([len(e.ids) + 1 for e in encodings], pa.int64()))
            table = table.append_column("n_bytes", pc.binary_length(batch.column("text").filter(mask)).cast(pa.int64()))
            table = table.append_column("shard", pa.array(shard, pa.string()))
            table = table.append_column("start", pa.array(start, pa.int64()))
            if writer is None:
                writer = pq.ParquetWriter(out / KEPT, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    # Closing writes each split's last .idx; after a failure the part's folder is discarded whole.
    written = {s: [[i.bin, i.idx, i.n_docs] for i in w.close()] for s, w in shards.items()}
    funnel = sum_funnels(funnels)
    return {"funnel": funnel, "docs": funnel["docs_out"], "shards": written}
