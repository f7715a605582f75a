"""Tokenizer stage: train a byte-level BPE vocabulary on the training split.

Design decisions:

- Byte-level BPE (GPT-2's scheme, via Hugging Face ``tokenizers``): every string of
  every language encodes without an unknown token, and ``decode(encode(text)) == text``
  exactly. No normalizer and no prefix space, so the round trip holds byte for byte.
- ``<|endoftext|>`` is the only special token and is added first, so its id is 0. The
  shards stage appends it after every document; :func:`load_tokenizer` makes a literal
  ``<|endoftext|>`` in web text encode as plain text, never as the special id.
- Trained on the **train split only**, using the same rule as the shards stage
  (:func:`storage.documents.iter_with_splits`): a document's split is ``split_of(augmented_from or
  doc_id)``, so a paraphrase lands where its source did. A vocabulary fitted to held-out
  text would leak it into the evaluation (bits per byte would look better than they are).
- Training reads the parent artifact batch by batch and hands ``train_from_iterator``
  lists of texts: memory stays at one batch plus the trainer's pair counts, never one big
  string. ``max_train_chars`` caps the sample for very large corpora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage.artifact import Manifest, Store
from storage.documents import SplitConfig, iter_with_splits
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, require_columns, stage_logger
from tasks.text.encode_parts import load_tokenizer_file

STAGE = Stage("tokenizer", __name__)
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
NO_DOCS_HINT = "filtering kept no documents: relax filter.languages or filter.min_lang_score, or feed more input"
log = stage_logger(STAGE.name)


class TokenizerConfig(StageConfig):
    """Byte-level BPE training settings."""

    vocab_size: int = Field(
        8192,
        ge=512,
        le=1 << 20,
        description="Target vocabulary size: 256 bytes, the merges and <|endoftext|>. A small corpus may stop short of it; the artifact records the actual size.",
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair of tokens must occur at least this often in the training text to be merged."
    )
    max_train_chars: int | None = Field(
        None,
        ge=1,
        description="Train on at most this many characters of training-split text, taken in artifact order; empty: all of it.",
    )


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
    b = STAGE.begin(store, cfg, docs=docs, split=split)
    if b.done:
        return b.done
    require_columns(
        STAGE.name, docs, ["doc_id", "text"], upstream="a text stage (filter or augment)", empty_hint=NO_DOCS_HINT
    )
    sample = _Sample()
    tok = build_tokenizer(cfg, _training_texts(docs, split, cfg.max_train_chars, sample))
    if sample.docs == 0:
        raise StageError(
            STAGE.name,
            docs.ref,
            "no non-empty training-split document to train the tokenizer on",
            f"{NO_DOCS_HINT}; with very few documents, lower split.val_fraction ({split.val_fraction})",
        )
    eot_id = tok.token_to_id(EOT_TOKEN)
    with STAGE.writer(store, b) as w:
        tok.save(str(w.dir / TOKENIZER_FILE))
        w.counters.update({"train_docs": sample.docs, "train_chars": sample.chars, "train_capped": sample.capped})
        w.meta.update(
            {
                "vocab_size": tok.get_vocab_size(),
                "eot_id": eot_id,
                "eot_token": EOT_TOKEN,
                "train_docs": sample.docs,
                "train_chars": sample.chars,
            }
        )
    log.info(
        "tokenizer: %d tokens learned from %d documents (%d characters)",
        tok.get_vocab_size(),
        sample.docs,
        sample.chars,
    )
    return w.manifest


def load_tokenizer(tokenizer: Manifest) -> Tokenizer:
    """The trained tokenizer of a tokenizer artifact, reading ``<|endoftext|>`` in text as text
    (:func:`tasks.text.encode_parts.load_tokenizer_file` says why)."""
    return load_tokenizer_file(tokenizer.path(TOKENIZER_FILE))


task = stage_task(STAGE, run)
