"""Tokenizer stage: train a byte-level BPE vocabulary on the training split.

Design decisions:

- Byte-level BPE (GPT-2's scheme, via Hugging Face ``tokenizers``): every string of
  every language encodes without an unknown token, and ``decode(encode(text)) == text``
  exactly. No normalizer and no prefix space, so the round trip holds byte for byte.
- ``<|endoftext|>`` is the only special token and is added first, so its id is 0. The
  shards stage appends it after every document; :func:`load_tokenizer` makes a literal
  ``<|endoftext|>`` in web text encode as plain text, never as the special id.
- Trained on the **train split only**, using the same rule as the shards stage
  (:func:`iter_with_splits`): a document's split is ``split_of(augmented_from or
  doc_id)``, so a paraphrase lands where its source did. A vocabulary fitted to held-out
  text would leak it into the evaluation (bits per byte would look better than they are).
- Training reads the parent artifact batch by batch and hands ``train_from_iterator``
  lists of texts: memory stays at one batch plus the trainer's pair counts, never one big
  string. ``max_train_chars`` caps the sample for very large corpora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage.artifact import Manifest, Store, iter_batches
from storage.documents import SplitConfig, split_of
from tasks.common import StageConfig, StageError, begin, code_version, stage_logger, stage_task

STAGE = "tokenizer"
CODE_VERSION = code_version(__name__)
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
NO_DOCS_HINT = "filtering kept no documents: relax filter.languages or filter.min_lang_score, or feed more input"
log = stage_logger(STAGE)


class TokenizerConfig(StageConfig):
    """Byte-level BPE training settings."""

    vocab_size: int = Field(8192, ge=512, le=1 << 20, description="Target vocabulary size: 256 bytes, the merges and <|endoftext|>. A small corpus may stop short of it; the artifact records the actual size.")
    min_frequency: int = Field(2, ge=1, description="A pair of tokens must occur at least this often in the training text to be merged.")
    max_train_chars: int | None = Field(None, ge=1, description="Train on at most this many characters of training-split text, taken in artifact order; empty: all of it.")


def doc_columns(docs: Manifest) -> set[str]:
    """Column names of a text artifact, read from its first part's schema."""
    parts = [f for f in docs.files_with_prefix("part-") if f.path.endswith(".parquet")]
    return set(pq.read_schema(docs.path(parts[0].path)).names) if parts else set()


def iter_with_splits(docs: Manifest, split: SplitConfig, columns: list[str], batch_size: int = 4096) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
    """Batches of a text artifact with each row's split, 'train' or 'val'.

    An augmented document (non-null ``augmented_from``) takes its source's split, so a
    paraphrase never sits on the other side of the split from its original.
    """
    augmented = "augmented_from" in doc_columns(docs)
    read = list(dict.fromkeys([*columns, "doc_id", *(["augmented_from"] if augmented else [])]))
    for batch in iter_batches(docs, batch_size=batch_size, columns=read):
        ids = batch.column("doc_id").to_pylist()
        sources = batch.column("augmented_from").to_pylist() if augmented else [None] * len(ids)
        yield batch, [split_of(src or doc_id, split) for src, doc_id in zip(sources, ids)]


def require_columns(stage: str, docs: Manifest, needed: list[str]) -> set[str]:
    """The artifact's columns; StageError when it has no parts or lacks a needed column."""
    have = doc_columns(docs)
    if not have:
        raise StageError(stage, docs.ref, "the documents artifact has no part-*.parquet files", NO_DOCS_HINT)
    missing = [c for c in needed if c not in have]
    if missing:
        raise StageError(stage, docs.ref, f"documents lack column(s) {missing}", "feed the output of a text stage (filter or augment)")
    return have


@dataclass
class _Sample:
    """What went into training, counted while the trainer consumes the batches."""

    docs: int = 0
    chars: int = 0
    capped: bool = False


def _take_chars(texts: list[str], budget: int) -> list[str]:
    """The leading texts that fit in ``budget`` characters, the last one cut to fit."""
    kept = []
    for t in texts:
        if budget <= 0:
            break
        kept.append(t[:budget])
        budget -= len(kept[-1])
    return kept


def _training_texts(docs: Manifest, split: SplitConfig, max_chars: int | None, sample: _Sample) -> Iterator[list[str]]:
    for batch, splits in iter_with_splits(docs, split, ["text"]):
        texts = [t for t, s in zip(batch.column("text").to_pylist(), splits) if s == "train" and t]
        if max_chars is not None:
            texts = _take_chars(texts, max_chars - sample.chars)
        sample.docs += len(texts)
        sample.chars += sum(map(len, texts))
        if texts:
            yield texts
        if max_chars is not None and sample.chars >= max_chars:
            sample.capped = True
            return


def build_tokenizer(cfg: TokenizerConfig, batches: Iterator[list[str]]) -> Tokenizer:
    """Train byte-level BPE on batches of texts, ``<|endoftext|>`` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer)
    return tok


def run(store: Store, cfg: TokenizerConfig, docs: Manifest, split: SplitConfig) -> Manifest:
    """Train the tokenizer on the train split of ``docs``; publish ``tokenizer.json``."""
    b = begin(store, STAGE, CODE_VERSION, cfg, docs=docs, split=split)
    if b.done:
        return b.done
    require_columns(STAGE, docs, ["doc_id", "text"])
    sample = _Sample()
    tok = build_tokenizer(cfg, _training_texts(docs, split, cfg.max_train_chars, sample))
    if sample.docs == 0:
        raise StageError(
            STAGE, docs.ref, "no non-empty training-split document to train the tokenizer on",
            f"{NO_DOCS_HINT}; with very few documents, lower split.val_fraction ({split.val_fraction})",
        )
    eot_id = tok.token_to_id(EOT_TOKEN)
    with store.writer(STAGE, b.key, parents=b.parents, config=b.config, code_version=CODE_VERSION) as w:
        tok.save(str(w.dir / TOKENIZER_FILE))
        w.counters.update({"train_docs": sample.docs, "train_chars": sample.chars, "train_capped": sample.capped})
        w.meta.update({
            "vocab_size": tok.get_vocab_size(),
            "eot_id": eot_id,
            "eot_token": EOT_TOKEN,
            "train_docs": sample.docs,
            "train_chars": sample.chars,
        })
    log.info("tokenizer: %d tokens learned from %d documents (%d characters)", tok.get_vocab_size(), sample.docs, sample.chars)
    return w.manifest


def load_tokenizer(tokenizer: Manifest) -> Tokenizer:
    """The trained tokenizer of a tokenizer artifact, reading ``<|endoftext|>`` in text as text.

    ``encode_special_tokens`` is not saved in ``tokenizer.json``, so it is set here: a web
    page or a prompt that contains the literal string must not end a document.
    """
    tok = Tokenizer.from_file(str(tokenizer.path(TOKENIZER_FILE)))
    tok.encode_special_tokens = True
    return tok


task = stage_task(run, name=STAGE, retries=0)
