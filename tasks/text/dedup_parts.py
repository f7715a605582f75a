"""The per-part steps of dedup: what one worker does with one Parquet part.

Two steps bracket the stage's global one (grouping in DuckDB, in ``tasks.dedup``):

- :func:`sign_part` reads a part's texts and writes, for every document with text, its
  ordinal and 16-byte content hash (``hashes.parquet``), and for the first document of
  each exact group *within the part* its MinHash band keys (``bands.parquet``). Twins in
  other parts are found globally; their band keys are written but never grouped.
  ``bands.parquet`` is band-major with one row group per band, so a query for one band
  reads only that band's row groups.
- :func:`apply_part` reads a part again with the decisions for its ordinal range (only
  dropped documents have one) and writes the kept documents (``part.parquet``, with
  ``cluster_id``) and the dropped ones (``dropped.parquet``, with reason and
  ``duplicate_of``), and returns its funnel (documents and whitespace words in, kept and
  dropped by reason: the attributes of ``storage.documents.Funnel``, as a dict).

Both take the part's file path and plain parameters: no store, no Prefect, so a worker
process imports only pyarrow, numpy and the MinHash engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.text import minhash
from tasks.text.tally import part_funnel

HASHES = "hashes.parquet"
BANDS = "bands.parquet"
KEPT = "part.parquet"
DROPPED = "dropped.parquet"


@dataclass(frozen=True)
class SignParams:
    """What signing needs from the stage's config (a plain value: workers unpickle it without the stage)."""

    exact: bool
    near: bool
    ngram: int
    num_perm: int
    bands: int
    rows: int
    seed: int


def content_hash(normalized: str) -> bytes:
    """The exact-dedup key of a normalized text: its 16-byte BLAKE2b."""
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


def sign_part(part, out: Path, p: SignParams) -> dict:
    """Hashes and band keys of one part (see the module docstring); returns row counts."""
    table = pq.read_table(part.path, columns=["doc_id", "text"])
    ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
    hash_ids, hash_ords, hashes = [], [], []
    band_ids, band_ords, sigs = [], [], []
    first_in_part: set = set()
    for i, (doc_id, text) in enumerate(zip(ids, texts)):
        if text is None:
            continue
        ordinal = part.start + i
        norm = minhash.normalize(text)
        key = content_hash(norm)
        hash_ids.append(doc_id)
        hash_ords.append(ordinal)
        hashes.append(key)
        if not p.near:
            continue
        group = key if p.exact else doc_id  # without exact dedup, only the same document twice is a twin
        if group in first_in_part:
            continue
        first_in_part.add(group)
        band_ids.append(doc_id)
        band_ords.append(ordinal)
        sigs.append(minhash.signature(minhash.shingle_hashes(norm, p.ngram), p.num_perm, p.seed))
    if hashes:
        pq.write_table(
            pa.table(
                {
                    "doc_id": pa.array(hash_ids, pa.string()),
                    "ord": pa.array(hash_ords, pa.int64()),
                    "hash": pa.array(hashes, pa.binary(16)),
                }
            ),
            out / HASHES,
            compression="zstd",
        )
    if sigs:
        n = len(sigs)
        keys = minhash.band_hashes(np.stack(sigs), p.bands, p.rows)  # [n, bands]
        pq.write_table(
            pa.table(
                {
                    "doc_id": pa.array(np.tile(np.array(band_ids, dtype=object), p.bands), pa.string()),
                    "ord": pa.array(np.tile(np.array(band_ords, dtype=np.int64), p.bands)),
                    "band": pa.array(np.repeat(np.arange(p.bands, dtype=np.int16), n)),
                    "band_hash": pa.array(keys.T.reshape(-1)),
                }
            ),
            out / BANDS,
            compression="zstd",
            row_group_size=n,
        )
    return {"hashes": len(hashes), "bands": len(sigs)}


def apply_part(part, out: Path, decisions: str) -> dict:
    """Kept and dropped documents of one part, from the decisions for its ordinals; its funnel."""
    table = pq.read_table(part.path)
    end = part.start + table.num_rows
    dec = pq.read_table(decisions, filters=[("ord", ">=", part.start), ("ord", "<", end)])
    ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
    cluster: list = list(ids)
    reason: list = [None] * len(ids)
    dup_of: list = [None] * len(ids)
    for i, text in enumerate(texts):
        if text is None:
            cluster[i], reason[i] = None, "missing_text"
    for o, r, d, c in zip(
        *(dec.column(n).to_pylist() for n in ("ord", "dropped_reason", "duplicate_of", "cluster_id"))
    ):
        i = o - part.start
        reason[i], dup_of[i], cluster[i] = r, d, c
    table = table.append_column("cluster_id", pa.array(cluster, pa.string()))
    keep = pa.array([r is None for r in reason], pa.bool_())
    kept = table.filter(keep)
    if kept.num_rows:
        pq.write_table(kept, out / KEPT, compression="zstd")
    dropped = table.append_column("dropped_reason", pa.array(reason, pa.string()))
    dropped = dropped.append_column("duplicate_of", pa.array(dup_of, pa.string())).filter(pc.invert(keep))
    if dropped.num_rows:
        pq.write_table(dropped, out / DROPPED, compression="zstd")
    return part_funnel(texts, reason)
