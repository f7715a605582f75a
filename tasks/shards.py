"""Shards stage: tokenize every document into flat token shards, indexed per document.

Design decisions:

- Output: ``tokens-<split>-NNNNN.bin/.idx`` shards per split (format in
  :mod:`storage.tokens`) and ``index-NNNNN.parquet`` with one row per document: its
  metadata (doc_id, url, source, lang, lang_score, signals as JSON, cluster_id,
  augmented_from), its split, and where its tokens are (shard, start, n_tokens
  including the EOT id) plus n_bytes, the UTF-8 size of its text, which bits per byte
  needs. The index is then loaded into the DuckDB catalog, where SQL selects subsets.
- Splits use the tokenizer stage's rule (:func:`tasks.tokenizer.iter_with_splits`):
  ``split_of(augmented_from or doc_id)``. An augmented document whose source is held
  out is dropped (``augmented_from_val``): validation holds only original text, so
  evaluation measures the web, not the paraphraser.
- Documents keep their artifact order inside a split; pretraining samples windows at
  random offsets, so shards need no shuffle and a rebuild is byte-identical.
- A literal ``<|endoftext|>`` in web text is encoded as text (:func:`load_tokenizer`):
  only the id appended after each document marks a document end.
- Encoding goes through ``encode_batch_fast`` (Rust, all cores, no offsets computed).
- An empty train split, or an empty validation split beside a non-empty train split,
  is a StageError: pretraining or evaluation would have nothing to read.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from storage.artifact import Manifest, PartBuffer, Store
from storage.catalog import Catalog
from storage.documents import Funnel, SplitConfig
from storage.tokens import DEFAULT_MAX_TOKENS, TokenShardWriter, token_dtype
from tasks.common import StageConfig, StageError, begin, code_version, stage_logger, stage_task
from tasks.tokenizer import NO_DOCS_HINT, iter_with_splits, load_tokenizer, require_columns

STAGE = "shards"
CODE_VERSION = code_version(__name__, "tasks.tokenizer", "storage.tokens")
SPLITS = ("train", "val")
INDEX_ROWS = 20_000
log = stage_logger(STAGE)

INDEX_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("url", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("lang_score", pa.float64()), ("signals", pa.string()), ("cluster_id", pa.string()),
    ("augmented_from", pa.string()), ("split", pa.string()), ("shard", pa.string()),
    ("start", pa.int64()), ("n_tokens", pa.int64()), ("n_bytes", pa.int64()),
])
METADATA = ["url", "source", "lang", "lang_score", "signals", "cluster_id", "augmented_from"]


class ShardsConfig(StageConfig):
    """Token shard layout and encoding batch size."""

    max_tokens_per_shard: int = Field(DEFAULT_MAX_TOKENS, ge=1024, description="A shard closes before the document that would take it past this many tokens (64M tokens = 128 MiB of uint16 by default).")
    batch_size: int = Field(1024, ge=1, le=1_000_000, description="Documents encoded per encode_batch call.")


def _as_json(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _metadata(batch: pa.RecordBatch, name: str, keep: pa.Array) -> pa.Array:
    """One metadata column of the kept rows in the index's type (nulls when absent)."""
    n = pc.sum(keep).as_py() or 0
    typ = INDEX_SCHEMA.field(name).type
    if name not in batch.schema.names:
        return pa.nulls(n, typ)
    col = batch.column(name).filter(keep)
    if name == "signals" and not pa.types.is_string(col.type):
        return pa.array([_as_json(v) for v in col.to_pylist(maps_as_pydicts="lossy")], typ)
    return col.cast(typ)


def _triage(batch: pa.RecordBatch, splits: list[str], funnel: Funnel) -> list[bool]:
    """Which rows to tokenize; the others are counted in the funnel with their reason."""
    texts = batch.column("text").to_pylist()
    names = batch.schema.names
    sources = batch.column("augmented_from").to_pylist() if "augmented_from" in names else [None] * len(texts)
    keep = []
    for text, s, src in zip(texts, splits, sources):
        funnel.seen(text)
        reason = "empty_text" if not text else "augmented_from_val" if src and s == "val" else None
        if reason:
            funnel.dropped(reason, text)
        else:
            funnel.kept(text)
        keep.append(reason is None)
    return keep


def _encode(tok, writers: dict[str, TokenShardWriter], texts: list[str], splits: list[str]) -> list[tuple[str, int, int]]:
    """Tokenize texts and append each to its split's shards; (shard, start, n_tokens) per text."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    placed: list = [None] * len(texts)
    for s, writer in writers.items():
        rows = [i for i, split in enumerate(splits) if split == s]
        for i, where in zip(rows, writer.add([encodings[i].ids for i in rows])):
            placed[i] = where
    return placed


def _index_table(batch: pa.RecordBatch, keep: pa.Array, splits: list[str], placed: list[tuple[str, int, int]]) -> pa.Table:
    shard, start, n_tokens = zip(*placed)
    return pa.table(
        {"doc_id": batch.column("doc_id").filter(keep).cast(pa.string())}
        | {c: _metadata(batch, c, keep) for c in METADATA}
        | {"split": pa.array(splits, pa.string()), "shard": pa.array(shard, pa.string()),
           "start": pa.array(start, pa.int64()), "n_tokens": pa.array(n_tokens, pa.int64()),
           "n_bytes": pc.binary_length(batch.column("text").filter(keep)).cast(pa.int64())},
        schema=INDEX_SCHEMA,
    )


def run(store: Store, cfg: ShardsConfig, docs: Manifest, tokenizer: Manifest, split: SplitConfig) -> Manifest:
    """Tokenize ``docs`` with ``tokenizer`` into train/val token shards; register them in the catalog."""
    b = begin(store, STAGE, CODE_VERSION, cfg, docs=docs, tokenizer=tokenizer, split=split)
    if b.done:
        register(store, b.done)
        return b.done
    columns = require_columns(STAGE, docs, ["doc_id", "text"])
    tok = load_tokenizer(tokenizer)
    eot_id, vocab_size = int(tokenizer.meta["eot_id"]), tok.get_vocab_size()
    funnel = Funnel()
    totals = {k: dict.fromkeys(SPLITS, 0) for k in ("docs", "tokens", "bytes")}
    with store.writer(STAGE, b.key, parents=b.parents, config=b.config, code_version=CODE_VERSION) as w:
        writers = {s: TokenShardWriter(w.dir, s, vocab_size, eot_id, cfg.max_tokens_per_shard) for s in SPLITS}
        index = PartBuffer(w, "index", max_rows=INDEX_ROWS)
        wanted = ["doc_id", "text", *(c for c in METADATA if c in columns)]
        for batch, splits in iter_with_splits(docs, split, wanted, batch_size=cfg.batch_size):
            keep = _triage(batch, splits, funnel)
            if not any(keep):
                continue
            kept_splits = [s for s, k in zip(splits, keep) if k]
            mask = pa.array(keep)
            placed = _encode(tok, writers, batch.column("text").filter(mask).to_pylist(), kept_splits)
            table = _index_table(batch, mask, kept_splits, placed)
            index.add_table(table)
            for s in SPLITS:
                rows = table.filter(pc.equal(table["split"], s))
                totals["docs"][s] += rows.num_rows
                totals["tokens"][s] += pc.sum(rows["n_tokens"]).as_py() or 0
                totals["bytes"][s] += pc.sum(rows["n_bytes"]).as_py() or 0
        index.flush()
        for s in SPLITS:
            for info in writers[s].close():
                w.set_rows(info.bin, info.n_docs)
                w.set_rows(info.idx, info.n_docs + 1)
        _check_splits(docs, split, totals["docs"], funnel)
        w.counters.update(funnel.as_counters())
        w.counters.update({"tokens_out": sum(totals["tokens"].values()), "tokens": totals["tokens"]})
        w.meta.update({"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "eot_id": eot_id, **totals})
    log.info("shards: %s tokens, %s documents written", totals["tokens"], totals["docs"])
    register(store, w.manifest)
    return w.manifest


def _check_splits(docs: Manifest, split: SplitConfig, n_docs: dict[str, int], funnel: Funnel) -> None:
    if n_docs["train"] == 0:
        raise StageError(
            STAGE, docs.ref, f"the train split is empty ({funnel.docs_in} documents in, {dict(funnel.dropped_docs)} dropped)",
            NO_DOCS_HINT,
        )
    if n_docs["val"] == 0:
        raise StageError(
            STAGE, docs.ref, f"the validation split is empty ({n_docs['train']} train documents, val_fraction={split.val_fraction})",
            "evaluation needs held-out documents: raise split.val_fraction or feed more documents",
        )


def register(store: Store, manifest: Manifest) -> None:
    """Record a shards artifact and its lineage in the catalog; index its documents once."""
    with Catalog(store.catalog_path) as cat:
        cat.register_lineage(store, manifest)
        if not cat.has_dataset(manifest.ref):
            cat.index_documents(manifest)


task = stage_task(run, name=STAGE, retries=0)
