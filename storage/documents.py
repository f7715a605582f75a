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
from typing import Iterable

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

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
    """How documents are assigned to train and validation, shared by augment and shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of source documents held out for validation, chosen by hash of doc_id.")
    seed: int = Field(0, ge=0, description="Salt of the split hash; change it to draw another split.")


def split_of(doc_id: str, split: SplitConfig) -> str:
    """'train' or 'val', deterministic in doc_id. Augmented documents use their source's id."""
    h = int.from_bytes(hashlib.sha256(f"{split.seed}:{doc_id}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < split.val_fraction else "train"


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
            "dropped": {r: {"docs": self.dropped_docs[r], "words": self.dropped_words[r]} for r in sorted(self.dropped_docs)},
        }


def table_from_rows(rows: Iterable[dict], schema: pa.Schema | None = None) -> pa.Table:
    """A table from dict rows; an empty input still gets the schema's columns."""
    rows = list(rows)
    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    if not rows:
        return BASE_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows)
