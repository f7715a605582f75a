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
- Encoding maps over the input's parts (:mod:`tasks.parts`: every core, or a Ray
  cluster): :func:`tasks.text.encode_parts.encode_part` tokenizes one part with
  ``encode_batch_fast`` (Rust, no offsets computed) into the part's own shards (a shard
  never spans two parts) and the part's index rows. The driver links the parts' shards
  into the artifact in artifact order, numbered per split (hard links), and writes the
  index: it reads and writes no token, so its work grows with the number of shards, not
  of tokens (through a bucket the part folders still come down to the driver and the
  artifact goes up, as for every stage). Shard
  boundaries, offsets and the index are the same bytes whatever the number of workers or
  the engine (tested), and a killed worker costs one part. Read one after the other, the
  shards are the documents' tokens in artifact order, as one sequence, as before.
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
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from storage.artifact import ArtifactWriter, Manifest, PartBuffer, Store, iter_batches, read_table
from storage.catalog import DOCUMENT_INDEX
from storage.documents import Funnel, SplitConfig, batch_splits, split_columns
from storage.tokens import DEFAULT_MAX_TOKENS, TokenShard, TokenShardWriter, flatten, shard_names, token_dtype
from tasks.parts.core import Execution, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, no_progress, require_columns, stage_logger
from tasks.text import encode_parts
from tasks.tokenizer import NO_DOCS_HINT, TOKENIZER_FILE, load_tokenizer

STAGE = Stage("shards", __name__)
SPLITS = encode_parts.SPLITS
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


def _metadata(table: pa.Table, name: str) -> pa.Array:
    """One metadata column in the index's type (nulls when absent)."""
    typ = DOCUMENT_INDEX.field(name).type
    if name not in table.schema.names:
        return pa.nulls(table.num_rows, typ)
    col = table[name].combine_chunks()
    if name == "signals" and not pa.types.is_string(col.type):
        return pa.array([_as_json(v) for v in col.to_pylist(maps_as_pydicts="lossy")], typ)
    return col.cast(typ)


def _place(part_dir: Path, part_shards: dict[str, list], w: ArtifactWriter, numbers: dict[str, int]) -> pa.Table:
    """Link one encoded part's shards into the artifact as the next shards of each split
    (``numbers``: the next number per split, advanced here); the part's index rows, their
    shard names those of the artifact. :mod:`tasks.text.encode_parts` wrote both."""
    renamed = {}
    for s in SPLITS:
        for bin_file, idx_file, n_docs in part_shards.get(s, []):
            bin_name, idx_name = shard_names(s, numbers[s])
            numbers[s] += 1
            w.add_file(part_dir / bin_file, bin_name, n_docs)
            w.add_file(part_dir / idx_file, idx_name, n_docs + 1)
            renamed[bin_file] = bin_name
    kept = pq.read_table(part_dir / encode_parts.KEPT)
    return pa.table(
        {"doc_id": kept["doc_id"].cast(pa.string())}
        | {c: _metadata(kept, c) for c in METADATA}
        | {
            "split": kept["split"],
            "shard": pa.array([renamed[name] for name in kept["shard"].to_pylist()], pa.string()),
            "start": kept["start"],
            "n_tokens": kept["n_tokens"],
            "n_bytes": kept["n_bytes"],
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
            w.add_file(previous.path(f.path), bin_name, rows[f.path])  # a hard link where it can be
            w.add_file(previous.path(f.path[: -len(".bin")] + ".idx"), idx_name, rows[f.path] + 1)
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
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Tokenize ``docs`` with ``tokenizer`` into train/val token shards with their document index.

    With ``previous`` (a dataset version made with the same tokenizer), the result is a
    new version: the previous documents that ``docs`` do not replace, plus ``docs``.
    ``execution`` sets the workers that encode the parts; the artifact is the same whatever it says.
    """
    b = STAGE.begin(store, cfg, docs=docs, tokenizer=tokenizer, split=split, previous=previous)
    if b.done:
        return b.done
    if previous is not None:
        _check_previous(previous, tokenizer)
    columns = require_columns(
        STAGE.name, docs, ["doc_id", "text"], upstream="a text stage (filter or augment)", empty_hint=NO_DOCS_HINT
    )
    eot_id, vocab_size = int(tokenizer.meta["eot_id"]), load_tokenizer(tokenizer).get_vocab_size()
    funnel = Funnel()
    totals = {k: dict.fromkeys(SPLITS, 0) for k in ("docs", "tokens", "bytes")} | {"languages": {}}
    parts = input_parts(docs)
    read = split_columns(docs, ["doc_id", "text", *(c for c in METADATA if c in columns)])
    work = store.work_dir(STAGE.name, b.key)
    with (
        PartMap(STAGE.name, work, execution=execution or Execution(), log=log, progress=progress, store=store) as pm,
        STAGE.writer(store, b) as w,
    ):
        splits_of, layout = partial(batch_splits, split=split), partial(flatten, eot_id=eot_id, vocab_size=vocab_size)
        shard_writer = partial(
            TokenShardWriter, vocab_size=vocab_size, eot_id=eot_id, max_tokens=cfg.max_tokens_per_shard
        )
        steps = (str(tokenizer.path(TOKENIZER_FILE)), splits_of, layout, shard_writer, read)
        results = pm.map("encode", encode_parts.encode_part, parts, *steps, cfg.batch_size)
        writers: dict[str, TokenShardWriter] = {}
        carried = (
            _carry(previous, _replaced(docs), w, writers, cfg, vocab_size, eot_id) if previous is not None else None
        )
        numbers = dict.fromkeys(SPLITS, 0)
        for s, writer in writers.items():  # the previous version's rewritten shards come first
            infos = writer.close()
            for info in infos:
                w.set_rows(info.bin, info.n_docs)
                w.set_rows(info.idx, info.n_docs + 1)
            numbers[s] = writer.first + len(infos)
        index = PartBuffer(w, "index", max_rows=INDEX_ROWS)
        for table in carried.index if carried else []:
            index.add_table(table)
            _add_totals(totals, table)
        for result, part_dir in zip(results, pm.outputs("encode", parts)):
            funnel.absorb(result["funnel"])
            if result["docs"]:
                table = _place(part_dir, result["shards"], w, numbers)
                index.add_table(table)
                _add_totals(totals, table)
        index.flush()
        _check_splits(docs, split, totals["docs"], funnel)
        unheld = _languages_without_val(totals["languages"], split)
        w.counters.update(funnel.as_counters())
        w.counters.update({"tokens_out": sum(totals["tokens"].values()), "tokens": totals["tokens"]})
        w.meta.update({"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "eot_id": eot_id, **totals})
        if unheld:
            w.meta["languages_without_val"] = unheld
        if carried is not None:
            w.meta["incremental"] = {"previous": previous.ref, "new_docs": funnel.docs_out, **carried.stats}
        w.meta["execution"] = {"parts": len(parts), **pm.describe()}
    shutil.rmtree(work, ignore_errors=True)
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


task = stage_task(STAGE, run, progress="shards: parts encoded")
