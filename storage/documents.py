"""The document schema shared by the text stages, and the funnel counters they keep.

Text artifacts hold ``part-*.parquet`` (kept documents) and ``dropped-*.parquet``
(documents removed by this stage, with ``dropped_reason``). Nothing disappears
silently: the funnel is the counters of every stage, and the dropped rows are there
to read. Columns every text artifact has: doc_id, url, source, fetched_at, text.
Stages add theirs (lang, lang_score, signals, cluster_id, augmented_from, ...).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Iterator, Literal
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.artifact import Manifest, columns_of, iter_batches

BASE_FIELDS = [
    pa.field("doc_id", pa.string()),
    pa.field("url", pa.string()),
    pa.field("source", pa.string()),
    pa.field("fetched_at", pa.string()),
    pa.field("text", pa.string()),
]
BASE_SCHEMA = pa.schema(BASE_FIELDS)


def make_doc_id(url: str, text: str = "") -> str:
    """Stable id: a hash of where a document came from and what it says."""
    return hashlib.sha256(f"{url}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def count_words(text: str) -> int:
    """Whitespace words: the funnel's size unit for stages that run before the tokenizer."""
    return len(text.split())


class SplitConfig(BaseModel):
    """How documents are assigned to train and validation, shared by augment, tokenizer and shards."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction of source documents held out for validation, chosen by a hash."
    )
    seed: int = Field(0, ge=0, description="Salt of the split hash; change it to draw another split.")
    by: Literal["doc_id", "url_path"] = Field(
        "doc_id",
        description="What the hash reads: 'doc_id' (the whole URL), or 'url_path' (the URL without scheme, host and port: a site served from another address keeps its split).",
    )


def url_path(url: str) -> str:
    """The part of a URL that names the page on its site: path and query, without scheme, host and port."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def split_of(doc_id: str, split: SplitConfig, url: str | None = None) -> str:
    """'train' or 'val', deterministic in doc_id (or in ``url``'s path, with ``by: url_path``).

    Augmented documents pass their source's id (and share its url), so a paraphrase lands
    on its source's side of the split.
    """
    key = url_path(url) if split.by == "url_path" and url is not None else doc_id
    h = int.from_bytes(hashlib.sha256(f"{split.seed}:{key}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < split.val_fraction else "train"


def iter_with_splits(
    docs: Manifest,
    split: SplitConfig,
    columns: list[str],
    batch_size: int = 4096,
) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
    """Batches of a text artifact with each row's split, 'train' or 'val'.

    An augmented document (non-null ``augmented_from``) takes its source's split, so a
    paraphrase never sits on the other side of the split from its original.
    """
    for batch in iter_batches(docs, batch_size=batch_size, columns=split_columns(docs, columns)):
        yield batch, batch_splits(batch, split)


def split_columns(docs: Manifest, columns: list[str]) -> list[str]:
    """``columns`` and those :func:`batch_splits` reads, that ``docs`` has."""
    extra = [c for c in ("augmented_from", "url") if c in columns_of(docs)]
    return list(dict.fromkeys([*columns, "doc_id", *extra]))


def batch_splits(batch: pa.RecordBatch, split: SplitConfig) -> list[str]:
    """Each row's split (read with :func:`split_columns`' columns): see :func:`iter_with_splits`."""
    names = batch.schema.names
    ids = batch.column("doc_id").to_pylist()
    sources = batch.column("augmented_from").to_pylist() if "augmented_from" in names else [None] * len(ids)
    urls = batch.column("url").to_pylist() if "url" in names else [None] * len(ids)
    return [split_of(src or doc_id, split, url) for src, doc_id, url in zip(sources, ids, urls)]


class Funnel:
    """Counts what a stage kept and dropped, in documents and words, by reason."""

    def __init__(self) -> None:
        self.docs_in = 0
        self.words_in = 0
        self.docs_out = 0
        self.words_out = 0
        self.dropped_docs: Counter[str] = Counter()
        self.dropped_words: Counter[str] = Counter()

    def seen(self, text: str | None) -> None:
        self.docs_in += 1
        self.words_in += count_words(text or "")

    def kept(self, text: str | None) -> None:
        self.docs_out += 1
        self.words_out += count_words(text or "")

    def dropped(self, reason: str, text: str | None = "") -> None:
        self.dropped_docs[reason] += 1
        self.dropped_words[reason] += count_words(text or "")

    def unkeep(self, reason: str, docs: int, words: int = 0) -> None:
        """Move ``docs`` documents counted as kept to dropped for ``reason``: a global step
        (ingest's grouping of URLs across files) dropped them after their part kept them."""
        self.docs_out -= docs
        self.words_out -= words
        self.dropped_docs[reason] += docs
        self.dropped_words[reason] += words

    def absorb(self, other: "Funnel | dict") -> None:
        """Add another funnel's counts to this one (a stage's funnel is the sum of its parts').

        ``other`` may be a plain dict of the same attributes: what a worker that does not
        import this module (an engine) counted.
        """
        c = other if isinstance(other, dict) else vars(other)
        self.docs_in += c["docs_in"]
        self.words_in += c["words_in"]
        self.docs_out += c["docs_out"]
        self.words_out += c["words_out"]
        self.dropped_docs.update(c["dropped_docs"])
        self.dropped_words.update(c["dropped_words"])

    def add_in(self, docs: int, words: int) -> None:
        self.docs_in += docs
        self.words_in += words

    def as_counters(self) -> dict:
        """The standard counters dict stored in a manifest and read by the funnel report."""
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "words_in": self.words_in,
            "words_out": self.words_out,
            "dropped": {
                r: {"docs": self.dropped_docs[r], "words": self.dropped_words[r]} for r in sorted(self.dropped_docs)
            },
        }


def table_from_rows(rows: Iterable[dict], schema: pa.Schema | None = None) -> pa.Table:
    """A table from dict rows; an empty input still gets the schema's columns."""
    rows = list(rows)
    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    if not rows:
        return BASE_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows)
