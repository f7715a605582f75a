"""The filter stage's per-document work and its config: language ID, then the quality rules.

Kept apart from the stage (``tasks.filter``) so that a worker process filtering one
part imports the rules, fastText and pyarrow, and not Prefect or the artifact store.
:func:`filter_part` is the per-part step (:mod:`tasks.parts`); the stage's docstring says
what is kept and why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

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
from tasks.text.settings import Settings
from tasks.text.tally import part_funnel

ADDED_COLUMNS = ("lang", "lang_score", "signals")
UNSEGMENTED = ["zh", "ja", "th", "lo", "km", "my", "bo", "wuu", "yue"]
KEPT = "part.parquet"
DROPPED = "dropped.parquet"


class FilterConfig(Settings):
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


def filter_part(part, out: Path, cfg: FilterConfig) -> dict:
    """Language and quality of every document of one part: kept ones to ``part.parquet``,
    dropped ones (with ``dropped_reason``) to ``dropped.parquet``, both with lang,
    lang_score and signals. Returns the part's funnel (the attributes of
    ``storage.documents.Funnel``, as a dict) and ``languages``, kept documents per language.
    """
    table = pq.read_table(part.path)
    texts = table.column("text").to_pylist()
    todo = [i for i, t in enumerate(texts) if t and t.strip()]
    found, probs = langid.identify([texts[i] for i in todo])
    lang: list = [None] * len(texts)
    score: list = [None] * len(texts)
    for i, code, p in zip(todo, found, probs):
        lang[i], score[i] = code, p
    signals: list = [None] * len(texts)
    reasons: list = []
    kept_langs: Counter = Counter()
    keep_any = not cfg.languages
    for i, text in enumerate(texts):
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
            kept_langs[lang[i]] += 1
    table = (
        table.append_column("lang", pa.array(lang, pa.string()))
        .append_column("lang_score", pa.array(score, pa.float64()))
        .append_column("signals", pa.array(signals, pa.string()))
    )
    keep = pa.array([r is None for r in reasons], pa.bool_())
    kept = table.filter(keep)
    if kept.num_rows:
        pq.write_table(kept, out / KEPT, compression="zstd")
    dropped = table.append_column("dropped_reason", pa.array(reasons, pa.string())).filter(pc.invert(keep))
    if dropped.num_rows:
        pq.write_table(dropped, out / DROPPED, compression="zstd")
    return {"funnel": part_funnel(texts, reasons), "languages": kept_langs}
