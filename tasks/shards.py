"""Shards stage: tokenize every document into flat token shards, indexed per document.

Design decisions:

- Output: ``tokens-<split>-NNNNN.bin/.idx`` shards per split (format in
  :mod:`storage.tokens`) and ``index-NNNNN.parquet`` with one row per document: its
  metadata (doc_id, url, source, lang, lang_score, signals as JSON, cluster_id,
  augmented_from), its split, and where its tokens are (shard, start, n_tokens
  including the EOT id) plus n_bytes, the UTF-8 size of its text, which bits per byte
  needs. The flow then loads the index into the DuckDB catalog (:func:`storage.catalog.register_dataset`),
  where SQL selects subsets; the catalog is written by the flow alone.
- Splits use the tokenizer stage's rule (:func:`storage.documents.iter_with_splits`):
  ``split_of(augmented_from or doc_id)``. An augmented document whose source is held
  out is dropped (``augmented_from_val``): validation holds only original text, so
  evaluation measures the web, not the paraphraser.
- Documents keep their artifact order inside a split; pretraining samples windows at
  random offsets, so shards need no shuffle and a rebuild is byte-identical.
- A literal ``<|endoftext|>`` in web text is encoded as text (:func:`load_tokenizer`):
  only the id appended after each document marks a document end.
- Encoding goes through ``encode_batch_fast`` (Rust, all cores, no offsets computed).
- An empty train split, or an empty validation split beside a non-empty train split,
  is a StageError: pretraining or evaluation would have nothing to read. A language
  with train documents and no validation document is a warning, listed in the meta
  (``languages_without_val``): evaluation, which reports per language, would skip it.
- Incremental refresh: with ``previous`` (the dataset version being extended), the new
  version is the previous one's documents, less those ``docs`` replace, plus ``docs``
  (the new and changed documents only). A document of ``docs`` replaces the previous
  document with its doc_id (the same URL: a changed page) and that document's
  paraphrases, so no doc_id appears twice. ``docs`` must be tokenized with the previous
  version's tokenizer: token ids stay comparable, and nothing is re-encoded.
  A previous shard none of whose documents is replaced is hard-linked into the new
  artifact (``os.link``, a copy across file systems): no bytes written, no disk space
  doubled per nightly version, and pretraining, which reads whole ``.bin`` files, sees
  the same tokens. A shard holding a replaced document is rewritten, its other
  documents' token spans copied (not re-encoded), since a whole-file link would keep
  the stale tokens in training. Linked shards are renumbered first, then rewritten
  spans and new documents fill the following shards, so names never collide. The index
  lists the carried documents first, then the new ones; ``previous`` is a parent, so
  the catalog's lineage reaches every earlier version.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from storage.artifact import ArtifactWriter, Manifest, PartBuffer, Store, iter_batches, read_table
from storage.catalog import DOCUMENT_INDEX
from storage.documents import Funnel, SplitConfig, iter_with_splits
from storage.tokens import DEFAULT_MAX_TOKENS, TokenShard, TokenShardWriter, shard_names, token_dtype
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, require_columns, stage_logger
from tasks.tokenizer import NO_DOCS_HINT, load_tokenizer

STAGE = Stage("shards", __name__)
SPLITS = ("train", "val")
INDEX_ROWS = 20_000
log = stage_logger(STAGE.name)
METADATA = ["url", "source", "lang", "lang_score", "signals", "cluster_id", "augmented_from"]


class ShardsConfig(StageConfig):
    """Token shard layout and encoding batch size."""

    max_tokens_per_shard: int = Field(
        DEFAULT_MAX_TOKENS,
        ge=1024,
        description="A shard closes before the document that would take it past this many tokens (64M tokens = 128 MiB of uint16 by default).",
    )
    batch_size: int = Field(1024, ge=1, le=1_000_000, description="Documents encoded per encode_batch call.")


def _as_json(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _metadata(batch: pa.RecordBatch, name: str, keep: pa.Array) -> pa.Array:
    """One metadata column of the kept rows in the index's type (nulls when absent)."""
    n = pc.sum(keep).as_py() or 0
    typ = DOCUMENT_INDEX.field(name).type
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


def _encode(
    tok, writers: dict[str, TokenShardWriter], texts: list[str], splits: list[str]
) -> list[tuple[str, int, int]]:
    """Tokenize texts and append each to its split's shards; (shard, start, n_tokens) per text."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    placed: list = [None] * len(texts)
    for s, writer in writers.items():
        rows = [i for i, split in enumerate(splits) if split == s]
        for i, where in zip(rows, writer.add([encodings[i].ids for i in rows])):
            placed[i] = where
    return placed


def _index_table(
    batch: pa.RecordBatch, keep: pa.Array, splits: list[str], placed: list[tuple[str, int, int]]
) -> pa.Table:
    shard, start, n_tokens = zip(*placed)
    return pa.table(
        {"doc_id": batch.column("doc_id").filter(keep).cast(pa.string())}
        | {c: _metadata(batch, c, keep) for c in METADATA}
        | {
            "split": pa.array(splits, pa.string()),
            "shard": pa.array(shard, pa.string()),
            "start": pa.array(start, pa.int64()),
            "n_tokens": pa.array(n_tokens, pa.int64()),
            "n_bytes": pc.binary_length(batch.column("text").filter(keep)).cast(pa.int64()),
        },
        schema=DOCUMENT_INDEX,
    )


@dataclass
class _Carried:
    """What an incremental version took over from the previous one."""

    index: list[pa.Table] = field(default_factory=list)
    stats: dict = field(
        default_factory=lambda: {"carried_docs": 0, "replaced_docs": 0, "linked_shards": 0, "rewritten_shards": 0}
    )


def _link(src: Path, dst: Path) -> None:
    """Hard-link an immutable file into a new artifact; copy it where links cannot cross file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_previous(previous: Manifest, tokenizer: Manifest) -> None:
    if previous.stage != STAGE.name:
        raise StageError(STAGE.name, previous.ref, "previous must be a shards artifact (a dataset version)")
    if tokenizer.ref not in previous.parents:
        raise StageError(
            STAGE.name,
            previous.ref,
            f"was not tokenized with {tokenizer.ref}: its token ids would not match the new documents'",
            "extend a dataset with its own tokenizer, or run a full refresh (incremental off)",
        )


def _replaced(docs: Manifest) -> pa.Array:
    """doc_ids of the documents in ``docs``: each replaces the previous version's document with its id."""
    ids = [b.column("doc_id") for b in iter_batches(docs, columns=["doc_id"])]
    return pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())


def _carry(
    previous: Manifest,
    replaced: pa.Array,
    w: ArtifactWriter,
    writers: dict[str, TokenShardWriter],
    cfg: ShardsConfig,
    vocab_size: int,
    eot_id: int,
) -> _Carried:
    """Link or rewrite the previous version's shards into ``w``; create ``writers`` after them."""
    out = _Carried()
    index = read_table(previous, "index").cast(DOCUMENT_INDEX)
    stale = pc.fill_null(
        pc.or_(pc.is_in(index["doc_id"], value_set=replaced), pc.is_in(index["augmented_from"], value_set=replaced)),
        False,
    )
    out.stats["replaced_docs"] = pc.sum(stale).as_py() or 0
    rows = {f.path: f.rows for f in previous.files}
    for s in SPLITS:
        rewrite: list[tuple[str, pa.Table]] = []
        number = 0
        for f in previous.files_with_prefix(f"tokens-{s}-"):
            if not f.path.endswith(".bin"):
                continue
            in_shard = pc.equal(index["shard"], f.path)
            keep = index.filter(pc.and_(in_shard, pc.invert(stale)))
            if keep.num_rows < (pc.sum(in_shard).as_py() or 0):
                rewrite.append((f.path, keep))
                continue
            bin_name, idx_name = shard_names(s, number)
            number += 1
            _link(previous.path(f.path), w.dir / bin_name)
            _link(previous.path(f.path[: -len(".bin")] + ".idx"), w.dir / idx_name)
            w.set_rows(bin_name, rows[f.path])
            w.set_rows(idx_name, rows[f.path] + 1)
            out.index.append(
                keep.set_column(
                    keep.schema.get_field_index("shard"),
                    DOCUMENT_INDEX.field("shard"),
                    pa.array([bin_name] * keep.num_rows, pa.string()),
                )
            )
            out.stats["linked_shards"] += 1
            out.stats["carried_docs"] += keep.num_rows
        writers[s] = TokenShardWriter(w.dir, s, vocab_size, eot_id, cfg.max_tokens_per_shard, first=number)
        for path, keep in rewrite:
            out.stats["rewritten_shards"] += 1
            out.stats["carried_docs"] += keep.num_rows
            if not keep.num_rows:
                continue
            shard = TokenShard(
                previous.path(path), previous.path(path[: -len(".bin")] + ".idx"), previous.meta["dtype"]
            )
            spans = [shard.span(st, n)[:-1] for st, n in zip(keep["start"].to_pylist(), keep["n_tokens"].to_pylist())]
            placed = writers[s].add(spans)
            names, starts, _ = zip(*placed)
            keep = keep.set_column(
                keep.schema.get_field_index("shard"), DOCUMENT_INDEX.field("shard"), pa.array(names, pa.string())
            )
            out.index.append(
                keep.set_column(
                    keep.schema.get_field_index("start"), DOCUMENT_INDEX.field("start"), pa.array(starts, pa.int64())
                )
            )
    return out


def run(
    store: Store,
    cfg: ShardsConfig,
    docs: Manifest,
    tokenizer: Manifest,
    split: SplitConfig,
    previous: Manifest | None = None,
) -> Manifest:
    """Tokenize ``docs`` with ``tokenizer`` into train/val token shards with their document index.

    With ``previous`` (a dataset version made with the same tokenizer), the result is a
    new version: the previous documents that ``docs`` do not replace, plus ``docs``.
    """
    b = STAGE.begin(store, cfg, docs=docs, tokenizer=tokenizer, split=split, previous=previous)
    if b.done:
        return b.done
    if previous is not None:
        _check_previous(previous, tokenizer)
    columns = require_columns(
        STAGE.name, docs, ["doc_id", "text"], upstream="a text stage (filter or augment)", empty_hint=NO_DOCS_HINT
    )
    tok = load_tokenizer(tokenizer)
    eot_id, vocab_size = int(tokenizer.meta["eot_id"]), tok.get_vocab_size()
    funnel = Funnel()
    totals = {k: dict.fromkeys(SPLITS, 0) for k in ("docs", "tokens", "bytes")} | {"languages": {}}
    with STAGE.writer(store, b) as w:
        writers: dict[str, TokenShardWriter] = {}
        carried = (
            _carry(previous, _replaced(docs), w, writers, cfg, vocab_size, eot_id) if previous is not None else None
        )
        for s in SPLITS:
            writers.setdefault(s, TokenShardWriter(w.dir, s, vocab_size, eot_id, cfg.max_tokens_per_shard))
        index = PartBuffer(w, "index", max_rows=INDEX_ROWS)
        for table in carried.index if carried else []:
            index.add_table(table)
            _add_totals(totals, table)
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
            _add_totals(totals, table)
        index.flush()
        for s in SPLITS:
            for info in writers[s].close():
                w.set_rows(info.bin, info.n_docs)
                w.set_rows(info.idx, info.n_docs + 1)
        _check_splits(docs, split, totals["docs"], funnel)
        unheld = _languages_without_val(totals["languages"], split)
        w.counters.update(funnel.as_counters())
        w.counters.update({"tokens_out": sum(totals["tokens"].values()), "tokens": totals["tokens"]})
        w.meta.update({"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "eot_id": eot_id, **totals})
        if unheld:
            w.meta["languages_without_val"] = unheld
        if carried is not None:
            w.meta["incremental"] = {"previous": previous.ref, "new_docs": funnel.docs_out, **carried.stats}
    log.info("shards: %s tokens, %s documents written", totals["tokens"], totals["docs"])
    return w.manifest


def _add_totals(totals: dict, table: pa.Table) -> None:
    for s in SPLITS:
        rows = table.filter(pc.equal(table["split"], s))
        totals["docs"][s] += rows.num_rows
        totals["tokens"][s] += pc.sum(rows["n_tokens"]).as_py() or 0
        totals["bytes"][s] += pc.sum(rows["n_bytes"]).as_py() or 0
        for lang, n in zip(*pc.value_counts(rows["lang"].fill_null("unknown")).flatten()):
            per_split = totals["languages"].setdefault(lang.as_py(), dict.fromkeys(SPLITS, 0))
            per_split[s] += n.as_py()


def _languages_without_val(languages: dict[str, dict[str, int]], split: SplitConfig) -> list[str]:
    """Languages with train documents and no validation document, with a warning for each.

    Not an error (a rare language may only be trained on), but evaluation reports per
    language from the validation split, so these would be missing from it without a word.
    """
    unheld = sorted(lang for lang, n in languages.items() if n["train"] and not n["val"])
    for lang in unheld:
        log.warning(
            "shards: language %r has %d train documents and none held out for validation (val_fraction=%s): "
            "evaluation will not report it; raise split.val_fraction to measure it",
            lang,
            languages[lang]["train"],
            split.val_fraction,
        )
    return unheld


def _check_splits(docs: Manifest, split: SplitConfig, n_docs: dict[str, int], funnel: Funnel) -> None:
    if n_docs["train"] == 0:
        raise StageError(
            STAGE.name,
            docs.ref,
            f"the train split is empty ({funnel.docs_in} documents in, {dict(funnel.dropped_docs)} dropped)",
            NO_DOCS_HINT,
        )
    if n_docs["val"] == 0:
        raise StageError(
            STAGE.name,
            docs.ref,
            f"the validation split is empty ({n_docs['train']} train documents, val_fraction={split.val_fraction})",
            "evaluation needs held-out documents: raise split.val_fraction or feed more documents",
        )


task = stage_task(STAGE, run)
