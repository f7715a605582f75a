"""The augment stage's per-part work and its config: choose documents, round-trip them, score them.

Kept apart from the stage (``tasks.augment``, whose docstring says what is chosen, kept
and why) so that a worker process augmenting one part imports the translators, sacrebleu
and pyarrow, and not Prefect or the artifact store. Two per-part steps (:mod:`tasks.parts`):

- :func:`rank_part`: the part's eligible documents (language with a pivot, train split,
  non-empty text) and the ranks of those below ``fraction``; the stage keeps the
  ``max_docs`` lowest ranks over all parts, so the choice is the whole artifact's.
- :func:`augment_part`: the part's documents, then the accepted paraphrases of its chosen
  ones, to ``part.parquet``; rejected paraphrases to ``dropped.parquet``.

A part's documents go to the translator in one call (Apertium's batches are then fixed by
the part, whatever the number of workers or the engine).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator
from sacrebleu.metrics import CHRF

from tasks.text.settings import Settings
from tasks.text.tally import part_funnel
from tasks.text.translators import ApertiumTranslator, MarianTranslator, Translator, TranslatorError

REASON_LOW = "roundtrip_chrf_low"
REASON_HIGH = "roundtrip_chrf_high"
KEPT = "part.parquet"
DROPPED = "dropped.parquet"
_LANG = re.compile(r"^[a-z]{2,3}$")
_CHRF = CHRF()


class AugmentConfig(Settings):
    """Back-translation settings: which documents, through which pivot, kept in which chrF band."""

    enabled: bool = Field(
        True, description="Add back-translated paraphrases. Off: the documents pass through unchanged."
    )
    backend: Literal["apertium", "marian"] = Field(
        "apertium",
        description="Translation backend: 'apertium' (Debian packages apertium + apertium-<pair>, offline) or 'marian' (MarianMT models in local directories).",
    )
    marian_models: dict[str, str] = Field(
        default_factory=dict,
        description="For backend 'marian': direction ('en-es') -> local directory of a MarianMT model (save_pretrained layout). Both directions of every pivot are needed.",
    )
    marian_batch_size: int = Field(16, ge=1, le=1024, description="Marian: sentences per generate() call.")
    marian_max_length: int = Field(
        256, ge=8, le=1024, description="Marian: longest sentence in tokens, input (truncated) and output."
    )
    marian_num_beams: int = Field(
        1,
        ge=1,
        le=16,
        description="Marian: beam width; 1 is greedy, the cheapest on a CPU (opus-mt's own default is 4).",
    )
    pivots: dict[str, str] = Field(
        default_factory=lambda: {"en": "es", "es": "en"},
        description="Document language -> pivot language (ISO 639-1). Documents in other languages are not augmented.",
    )
    fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Fraction of eligible documents (train split, language in pivots) that get a paraphrase, chosen by hash of doc_id.",
    )
    max_docs: int = Field(
        10_000, ge=0, description="At most this many candidate paraphrases per run (the lowest hashes win)."
    )
    max_chars: int = Field(
        2000,
        ge=100,
        le=1_000_000,
        description="Round-trip at most this many characters of a document, cut at a paragraph boundary: bounds the cost per document.",
    )
    chrf_min: float = Field(
        50.0,
        ge=0.0,
        le=100.0,
        description="Reject a paraphrase whose chrF against its source prefix is below this (garbage, or text not in its labelled language).",
    )
    chrf_max: float = Field(
        90.0,
        ge=0.0,
        le=100.0,
        description="Reject a paraphrase whose chrF is above this (the round trip changed almost nothing).",
    )
    seed: int = Field(0, ge=0, description="Salt of the document choice; change it to paraphrase other documents.")

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        if self.chrf_min > self.chrf_max:
            raise ValueError(f"chrf_min ({self.chrf_min}) is above chrf_max ({self.chrf_max})")
        for src, pivot in self.pivots.items():
            if not (_LANG.match(src) and _LANG.match(pivot)) or src == pivot:
                raise ValueError(f"pivot {src!r} -> {pivot!r}: need two different ISO 639-1 codes like 'en' -> 'es'")
        for direction in self.marian_models:
            if not re.match(r"^[a-z]{2,3}-[a-z]{2,3}$", direction):
                raise ValueError(f"marian_models key {direction!r}: expected a direction like 'en-es'")
        return self

    @property
    def active(self) -> bool:
        return self.enabled and self.fraction > 0 and self.max_docs > 0


def selection_rank(doc_id: str, seed: int) -> float:
    """Uniform in [0, 1), deterministic in (seed, doc_id): below ``fraction`` means chosen."""
    h = hashlib.sha256(f"augment:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def text_prefix(text: str, max_chars: int) -> str:
    """The text, or its longest prefix of <= max_chars ending at a paragraph, line, sentence or word end."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for boundary in ("\n\n", "\n", ". ", " "):
        cut = head.rfind(boundary)
        if cut > 0:
            return head[: cut + (1 if boundary == ". " else 0)].rstrip()
    return head


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence-level chrF (0-100) of a back-translation against the text it came from."""
    return _CHRF.sentence_score(hypothesis, [reference]).score


def make_translator(cfg: AugmentConfig) -> Translator:
    """The configured backend, checked to support both directions of every pivot."""
    if cfg.backend == "apertium":
        t: Translator = ApertiumTranslator()
    else:
        t = MarianTranslator(cfg.marian_models, cfg.marian_batch_size, cfg.marian_max_length, cfg.marian_num_beams)
    for src, pivot in cfg.pivots.items():
        for a, b in ((src, pivot), (pivot, src)):
            if (a, b) not in t.pairs:
                hint = (
                    f"install the Debian package of the {a}-{b} pair (apertium-{a}-{b} or its ISO 639-3 name)"
                    if cfg.backend == "apertium"
                    else f"add a local model directory for '{a}-{b}' to marian_models"
                )
                raise TranslatorError(
                    f"{t.name} backend has no {a}-{b} direction, needed by pivot {src}->{pivot}", hint
                )
    return t


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input's columns, then ``augmented_from`` (the paraphrased doc_id) and ``chrf``."""
    return schema.append(pa.field("augmented_from", pa.string())).append(pa.field("chrf", pa.float64()))


def rank_part(part, out: Path, cfg: AugmentConfig, splits_of: Callable[[pa.RecordBatch], list[str]]) -> dict:
    """Which of the part's documents may be paraphrased: ``eligible`` and ``val_skipped`` counts,
    and ``ranked``, ``[rank, doc_id]`` of the eligible ones below ``fraction`` (only the part's
    ``max_docs`` lowest: no more can be among the artifact's lowest)."""
    columns = [c for c in ("doc_id", "url", "lang", "text") if c in pq.read_schema(part.path).names]
    ranked: list[tuple[float, str]] = []
    eligible = val_skipped = 0
    for batch in pq.ParquetFile(part.path).iter_batches(columns=columns):
        ids, langs, texts = (batch.column(c).to_pylist() for c in ("doc_id", "lang", "text"))
        for doc_id, lang, text, split in zip(ids, langs, texts, splits_of(batch)):
            if lang not in cfg.pivots or not (text and text.strip()):
                continue
            if split != "train":
                val_skipped += 1
                continue
            eligible += 1
            rank = selection_rank(doc_id, cfg.seed)
            if rank < cfg.fraction:
                ranked.append((rank, doc_id))
    return {"eligible": eligible, "val_skipped": val_skipped, "ranked": sorted(ranked)[: cfg.max_docs]}


_translators: dict[str, Translator] = {}  # a worker keeps its backend (Marian's models) from part to part


def translator_for(cfg: AugmentConfig) -> Translator:
    """The configured backend, made once per process."""
    key = cfg.model_dump_json()
    if key not in _translators:
        _translators[key] = make_translator(cfg)
    return _translators[key]


def augment_part(
    part,
    out: Path,
    chosen: list[str],
    cfg: AugmentConfig,
    schema: pa.Schema,
    doc_id_of: Callable[[str, str], str],
) -> dict:
    """The part's documents (cast to the artifact's ``schema``) and the accepted paraphrases of
    its ``chosen`` doc_ids to ``part.parquet``, rejected ones to ``dropped.parquet``; returns the
    part's funnel and its candidates' tally (``doc_id_of(url, text)``: the store's document id)."""
    table = pq.read_table(part.path).cast(schema)
    texts = table.column("text").to_pylist()
    funnel = part_funnel(texts, [None] * len(texts))
    tally = {"candidates": 0, "accepted": 0, "rejected": Counter(), "scores": [], "words": 0, "seconds": 0.0}
    wanted = set(chosen)
    picked = [i for i, d in enumerate(table.column("doc_id").to_pylist()) if d in wanted]
    accepted, rejected = (
        _round_trip(translator_for(cfg), table.take(picked).to_pylist(), cfg, tally, doc_id_of) if picked else ([], [])
    )
    added = part_funnel([r["text"] for r in accepted], [None] * len(accepted))
    funnel["docs_out"] += added["docs_out"]
    funnel["words_out"] += added["words_out"]
    out_schema = output_schema(schema)
    originals = table.append_column("augmented_from", pa.nulls(table.num_rows, pa.string())).append_column(
        "chrf", pa.nulls(table.num_rows, pa.float64())
    )
    kept = pa.concat_tables([originals, pa.Table.from_pylist(accepted, schema=out_schema)])
    pq.write_table(kept, out / KEPT, compression="zstd")
    if rejected:
        dropped_schema = out_schema.append(pa.field("dropped_reason", pa.string()))
        pq.write_table(pa.Table.from_pylist(rejected, schema=dropped_schema), out / DROPPED, compression="zstd")
    return {"funnel": funnel, **tally}


def _round_trip(
    translator: Translator, rows: list[dict], cfg: AugmentConfig, tally: dict, doc_id_of: Callable[[str, str], str]
) -> tuple[list[dict], list[dict]]:
    """Paraphrase source rows; returns (accepted, rejected) rows of the output schema."""
    accepted: list[dict] = []
    rejected: list[dict] = []
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_lang[row["lang"]].append(row)
    for src, group in sorted(by_lang.items()):
        pivot = cfg.pivots[src]
        prefixes = [text_prefix(r["text"], cfg.max_chars) for r in group]
        start = time.perf_counter()
        middle = translator.translate(prefixes, src, pivot)
        back = translator.translate(middle, pivot, src)
        tally["seconds"] += time.perf_counter() - start
        tally["words"] += sum(len(t.split()) for t in prefixes + middle)
        for row, prefix, text in zip(group, prefixes, back):
            score = chrf(text, prefix)
            new = dict.fromkeys(row)
            new.update(
                doc_id=doc_id_of((row["url"] or "") + "#bt-" + pivot, text),
                url=row["url"],
                source=f"backtranslation:{translator.name}:{src}-{pivot}-{src}",
                fetched_at=row["fetched_at"],
                text=text,
                lang=src,
                augmented_from=row["doc_id"],
                chrf=score,
            )
            tally["candidates"] += 1
            tally["scores"].append(score)
            reason = REASON_LOW if score < cfg.chrf_min else REASON_HIGH if score > cfg.chrf_max else None
            if reason is None:
                tally["accepted"] += 1
                accepted.append(new)
            else:
                tally["rejected"][reason] += 1
                rejected.append({**new, "dropped_reason": reason})
    return accepted, rejected
