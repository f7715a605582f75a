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
  string.
- The trainer is one process (tokenizers' Rust threads) holding the counts of every
  distinct word of its text, so it trains on a bounded sample: ``max_train_chars``
  (default 1 G characters) of training documents chosen by a hash of their doc_id
  (:mod:`tasks.text.tokenizer_sample`), spread over the whole artifact and the same
  whatever its parts. Measuring the split for that choice maps over the input's parts
  (every core, or Ray: ``execution``); when everything fits, every training document is
  used, in artifact order, and no hash is computed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from typing import Iterator

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage.artifact import Manifest, Store
from storage.documents import SplitConfig, batch_splits, iter_with_splits
from tasks.parts.core import Execution, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, no_progress, require_columns, stage_logger
from tasks.text import tokenizer_sample
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
        1_000_000_000,
        ge=1,
        description="Train on at most this many characters of training-split text: the documents of the lowest hash ranks that fit; empty: all of it, however large.",
    )
    sample_seed: int = Field(
        0, ge=0, description="Salt of the sample's hash ranks; change it to train on other documents."
    )


@dataclass
class _Sample:
    """What went into training, counted while the trainer consumes the batches."""

    docs: int = 0
    chars: int = 0
    capped: bool = False


def _training_texts(
    docs: Manifest, split: SplitConfig, buckets: int, seed: int, sample: _Sample
) -> Iterator[list[str]]:
    """The training split's non-empty texts in artifact order, those in the lowest ``buckets``
    rank buckets only (``BUCKETS``: all, without hashing)."""
    for batch, splits in iter_with_splits(docs, split, ["text"]):
        texts = batch.column("text").to_pylist()
        keep = [s == "train" and bool(t) for t, s in zip(texts, splits)]
        if buckets < tokenizer_sample.BUCKETS:
            ids = batch.column("doc_id").to_pylist()
            keep = [k and tokenizer_sample.bucket_of(d, seed) < buckets for k, d in zip(keep, ids)]
        texts = [t for t, k in zip(texts, keep) if k]
        sample.docs += len(texts)
        sample.chars += sum(map(len, texts))
        if texts:
            yield texts


def _buckets(
    store: Store, key: str, docs: Manifest, cfg: TokenizerConfig, split: SplitConfig, execution: Execution, progress
) -> tuple[int, int | None, dict | None]:
    """How many rank buckets fit in ``max_train_chars`` (all of them without a cap), the
    training split's characters, and what measured them (both None without a cap: nothing
    is measured, and no engine is started)."""
    if cfg.max_train_chars is None:
        return tokenizer_sample.BUCKETS, None, None
    parts = input_parts(docs)
    work = store.work_dir(STAGE.name, key)
    with PartMap(STAGE.name, work, execution=execution, log=log, progress=progress, store=store) as pm:
        splits_of = partial(batch_splits, split=split)
        measured = pm.map("measure", tokenizer_sample.measure_part, parts, cfg.sample_seed, splits_of)
        described = {"parts": len(parts), **pm.describe()}
    shutil.rmtree(work, ignore_errors=True)
    buckets, fitting, total = tokenizer_sample.buckets_within([m["chars"] for m in measured], cfg.max_train_chars)
    if fitting == 0 and total:
        raise StageError(
            STAGE.name,
            "config.max_train_chars",
            f"no training document fits in {cfg.max_train_chars} characters (the sample takes whole documents)",
            f"raise tokenizer.max_train_chars; the training split holds {total} characters",
        )
    return buckets, total, described


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


def run(
    store: Store,
    cfg: TokenizerConfig,
    docs: Manifest,
    split: SplitConfig,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Train the tokenizer on the train split of ``docs`` (a bounded sample of it); publish ``tokenizer.json``.

    ``execution`` sets the workers that measure the split; the artifact is the same whatever it says.
    """
    b = STAGE.begin(store, cfg, docs=docs, split=split)
    if b.done:
        return b.done
    require_columns(
        STAGE.name, docs, ["doc_id", "text"], upstream="a text stage (filter or augment)", empty_hint=NO_DOCS_HINT
    )
    buckets, split_chars, described = _buckets(store, b.key, docs, cfg, split, execution or Execution(), progress)
    sample = _Sample(capped=buckets < tokenizer_sample.BUCKETS)
    tok = build_tokenizer(cfg, _training_texts(docs, split, buckets, cfg.sample_seed, sample))
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
                "sample": {"buckets": buckets, "of": tokenizer_sample.BUCKETS, "split_chars": split_chars},
                "execution": described,
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


task = stage_task(STAGE, run, progress="tokenizer: parts measured")
