"""Augment stage: paraphrases of training documents by back-translation (src -> pivot -> src).

Design decisions:

- Every input document passes through unchanged (``augmented_from`` and ``chrf`` null);
  accepted paraphrases are added as new documents. ``docs_in``/``docs_out`` describe that
  stream, so ``docs_out`` can exceed ``docs_in``. Candidate paraphrases have their own
  counters (``counters["augment"]``); rejected ones sit in ``dropped-*`` with their reason.
- Only **train-split** documents are augmented (``split_of`` with the shared
  :class:`SplitConfig`). A paraphrase inherits its source's split downstream (through
  ``augmented_from``), and a validation document's paraphrase in train would leak it.
- Which documents get a paraphrase is a hash of (seed, doc_id) below ``fraction``; with
  ``max_docs`` the lowest hashes win. The choice is deterministic and does not depend on
  the order or sharding of the input (a first pass reads only ids, languages and texts).
- Cost is bounded per document: only a prefix of at most ``max_chars``, cut at a
  paragraph (else line, sentence, word) boundary, is round-tripped, and the paraphrase
  is that prefix's back-translation.
- Quality gate: chrF (sacrebleu, character 6-grams) between the prefix and its back-
  translation must lie in [chrf_min, chrf_max]. Too high means the round trip changed
  next to nothing (a heading, names, numbers); too low means garbage, typically text in
  another language than its ``lang`` label. Defaults from Apertium en<->es round trips
  of 2,000-character prefixes of the Debian handbook: English pages scored 59-92
  (median 78, 5th-95th percentile 68-86); Spanish pages 33-93, where everything below
  ~45 was an untranslated English page inside the Spanish edition. So 50 and 90.
- A paraphrase keeps url, fetched_at and lang of its source and gets a new doc_id
  (``make_doc_id(url + "#bt-" + pivot, text)``) and source
  ``backtranslation:<backend>:<src>-<pivot>-<src>``. Columns that other stages measured
  on the original text (lang_score, quality signals, cluster ids) are null: they do not
  describe the paraphrase.
- The translation backend (installed Apertium data, Marian model files) lives outside
  the store: its fingerprint is the stage's declared external input (:func:`installed_translator`).
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator
from sacrebleu.metrics import CHRF

from storage.artifact import Manifest, Store, iter_batches
from storage.documents import Funnel, SplitConfig, count_words, make_doc_id, split_of
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, require_columns, stage_logger
from tasks.text.translators import ApertiumTranslator, MarianTranslator, Translator, TranslatorError

BATCH_ROWS = 5000  # input rows per output part: originals + their paraphrases stay <= 10,000 rows
REASON_LOW = "roundtrip_chrf_low"
REASON_HIGH = "roundtrip_chrf_high"
_LANG = re.compile(r"^[a-z]{2,3}$")
_CHRF = CHRF()
log = stage_logger("augment")


class AugmentConfig(StageConfig):
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


def installed_translator(cfg: AugmentConfig, **_: object) -> str:
    """The external input of augment: the identity of the installed translation models."""
    if not cfg.active:
        return "off"
    try:
        return make_translator(cfg).fingerprint()
    except TranslatorError:
        return f"{cfg.backend}:unavailable"


STAGE = Stage("augment", __name__, external=installed_translator)


@dataclass
class _Tally:
    """Candidate paraphrases: how many, their scores, and what translating them cost."""

    candidates: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    words: int = 0
    seconds: float = 0.0


def _choose(docs: Manifest, cfg: AugmentConfig, split: SplitConfig) -> tuple[set[str], dict[str, int]]:
    """First pass: the doc_ids to paraphrase, and how many were eligible or held out."""
    ranked: list[tuple[float, str]] = []
    eligible = val_skipped = 0
    for batch in iter_batches(docs, columns=["doc_id", "url", "lang", "text"]):
        for doc_id, url, lang, text in zip(*(batch.column(c).to_pylist() for c in ("doc_id", "url", "lang", "text"))):
            if lang not in cfg.pivots or not (text and text.strip()):
                continue
            if split_of(doc_id, split, url) != "train":
                val_skipped += 1
                continue
            eligible += 1
            rank = selection_rank(doc_id, cfg.seed)
            if rank < cfg.fraction:
                ranked.append((rank, doc_id))
    chosen = {doc_id for _, doc_id in sorted(ranked)[: cfg.max_docs]}
    return chosen, {"eligible": eligible, "val_skipped": val_skipped}


def _round_trip(
    translator: Translator, rows: list[dict], cfg: AugmentConfig, tally: _Tally
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
        tally.seconds += time.perf_counter() - start
        tally.words += sum(map(count_words, prefixes)) + sum(map(count_words, middle))
        for row, prefix, text in zip(group, prefixes, back):
            score = chrf(text, prefix)
            url = row["url"] or ""
            new = dict.fromkeys(row)
            new.update(
                doc_id=make_doc_id(url + "#bt-" + pivot, text),
                url=row["url"],
                source=f"backtranslation:{translator.name}:{src}-{pivot}-{src}",
                fetched_at=row["fetched_at"],
                text=text,
                lang=src,
                augmented_from=row["doc_id"],
                chrf=score,
            )
            tally.candidates += 1
            tally.scores.append(score)
            reason = REASON_LOW if score < cfg.chrf_min else REASON_HIGH if score > cfg.chrf_max else None
            if reason is None:
                tally.accepted += 1
                accepted.append(new)
            else:
                tally.rejected[reason] += 1
                rejected.append({**new, "dropped_reason": reason})
    return accepted, rejected


def _input_schema(docs: Manifest) -> pa.Schema | None:
    parts = [f for f in docs.files_with_prefix("part-") if f.path.endswith(".parquet")]
    return pq.read_schema(docs.path(parts[0].path)) if parts else None


def run(store: Store, cfg: AugmentConfig, docs: Manifest, split: SplitConfig) -> Manifest:
    """Pass every document through and add accepted back-translations of chosen train documents."""
    b = STAGE.begin(store, cfg, docs=docs, split=split)
    if b.done:
        return b.done
    require_columns(
        STAGE.name,
        docs,
        ["doc_id", "text", *(["lang"] if cfg.active else [])],
        absent=("augmented_from", "chrf"),
        upstream="the filter stage (language identification)",
        allow_empty=True,
    )
    schema = _input_schema(docs)
    active = cfg.active and schema is not None
    try:
        translator = make_translator(cfg) if active else None
    except TranslatorError as e:
        raise StageError(STAGE.name, f"backend {cfg.backend}", str(e), e.hint) from e
    chosen, pool = _choose(docs, cfg, split) if active else (set(), {"eligible": 0, "val_skipped": 0})
    out_schema = (
        (schema or pa.schema([])).append(pa.field("augmented_from", pa.string())).append(pa.field("chrf", pa.float64()))
    )
    dropped_schema = out_schema.append(pa.field("dropped_reason", pa.string()))
    funnel, tally = Funnel(), _Tally()
    with STAGE.writer(store, b) as w:
        for batch in iter_batches(docs, batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch]).cast(schema)
            n = table.num_rows
            for text in table.column("text").to_pylist():
                funnel.seen(text)
                funnel.kept(text)
            originals = table.append_column("augmented_from", pa.nulls(n, pa.string())).append_column(
                "chrf", pa.nulls(n, pa.float64())
            )
            picked = [i for i, d in enumerate(table.column("doc_id").to_pylist()) if d in chosen]
            accepted: list[dict] = []
            if picked:
                try:
                    accepted, rejected = _round_trip(translator, table.take(picked).to_pylist(), cfg, tally)
                except TranslatorError as e:
                    raise StageError(STAGE.name, docs.ref, str(e), e.hint) from e
                for row in accepted:
                    funnel.kept(row["text"])
                if rejected:
                    w.write_table(pa.Table.from_pylist(rejected, schema=dropped_schema), "dropped")
                log.info("augment: %d/%d candidates done, %d accepted", tally.candidates, len(chosen), tally.accepted)
            w.write_table(pa.concat_tables([originals, pa.Table.from_pylist(accepted, schema=out_schema)]))
        if schema is not None and funnel.docs_in == 0:
            w.write_table(out_schema.empty_table())
        w.counters.update(funnel.as_counters())
        w.counters["augment"] = {
            **pool,
            "candidates": tally.candidates,
            "accepted": tally.accepted,
            "rejected": dict(sorted(tally.rejected.items())),
            "words_translated": tally.words,
        }
        w.meta.update(backend=cfg.backend if active else None, translate_seconds=round(tally.seconds, 3))
        w.meta["words_per_s"] = round(tally.words / tally.seconds, 1) if tally.seconds > 0 else None
        if tally.scores:
            s = sorted(tally.scores)
            deciles = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9
            w.meta["chrf"] = {
                "min": s[0],
                "p10": deciles[0],
                "median": statistics.median(s),
                "p90": deciles[-1],
                "max": s[-1],
            }
    log.info(
        "augment: %d documents in, %d paraphrases accepted of %d candidates (%s words/s)",
        funnel.docs_in,
        tally.accepted,
        tally.candidates,
        w.meta["words_per_s"],
    )
    return w.manifest


task = stage_task(STAGE, run)
