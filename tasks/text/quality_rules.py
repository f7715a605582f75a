"""Heuristic quality rules of Gopher, C4 and FineWeb, as pure functions over one document.

Each family function takes a :class:`Parsed` document, its config and a :class:`Scope`,
and returns ``(signals, reason)``: the numbers it measured and the first rule that
fails as ``"<family>:<rule>"``, or None. Every threshold defaults to its paper's value
and ``None`` turns a rule off; ``enabled=False`` turns a family off.

Which rules apply to which language (the scope):

- **Word-statistics rules** count words, their length, stop words and symbols per
  word. They assume space-separated words of an alphabetic script and, for stop words,
  English; they run only for the filter's ``quality_languages`` (default English). The
  stop-word rule also needs a list for the language (``stop_words``). Gopher quality:
  short_doc, long_doc, short_words, long_words, hash_ratio, ellipsis_ratio,
  alpha_words, stop_words.
- **Segmented-script rules** use whitespace tokens, sentence punctuation or line
  lengths in characters, which mean nothing where words are not separated by spaces or
  sentences end without a mark (Chinese, Japanese, Thai, Lao, Khmer, Burmese,
  Tibetan: the filter's ``unsegmented_languages``). They run for every other language:
  Gopher repetition top_Ngram and dup_Ngram; C4 min_sentences; FineWeb line_punct,
  short_lines, newline_ratio.
- **Line rules** (every language): Gopher bullet_lines, ellipsis_lines; Gopher
  repetition dup_lines, dup_paragraphs, dup_line_chars, dup_paragraph_chars; C4
  lorem_ipsum, curly_brace; FineWeb dup_line_chars.

Choices where the sources differ or are vague:

- Words are regex word tokens (letters/digits, joined by inner ``-'’.``), punctuation
  left out, close to datatrove's tokenizer. Stop words are matched case-insensitively;
  their count is occurrences (datatrove), not distinct words.
- Lines are non-blank lines, stripped; paragraphs are blocks between blank lines.
- N-gram character fractions are over word characters. A top n-gram counts only when
  it occurs more than once (a short document's only 2-gram is not "repetition");
  duplicated n-grams count the words covered by any repeat of an earlier n-gram, which
  equals datatrove's greedy scan on ordinary text and never exceeds 1.
- C4 runs document-level only (this stage does not rewrite text): lorem ipsum, ``{``,
  and at least 5 sentences. The ``{`` rule is **off** by default: C4 used it to drop
  code, but a technical corpus (e.g. the Debian handbook) legitimately shows shell and
  config snippets, and extraction already strips scripts. The terminal-punctuation
  rule is off as in FineWeb (alone it removed ~30% of tokens); when on, sentences are
  counted only in lines that end in terminal punctuation, as if C4 had removed the
  others.
- FineWeb's character-duplication threshold is the paper's 0.1, not datatrove's 0.01;
  datatrove's extra newline/word rule (0.3) is available but off (not in the paper).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pydantic import Field, field_validator

from tasks.text.settings import Settings

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
TERMINAL_PUNCT = (".", "!", "?", "…", "。", "！", "？", "।", "؟", "۔", "։", "።", "။", "។", '"', "'", "”", "’", "»")
BULLETS = ("•", "-", "*", "◦", "‣")
_WORD = re.compile(r"\w+(?:[-'’.]\w+)*")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]")
_PARAGRAPH = re.compile(r"\n\s*\n")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram hash
_MIX = np.random.RandomState(0).randint(0, 1 << 63, size=64, dtype=np.uint64)  # per-n tags of n-gram hashes
_NOT_LETTERS = str.maketrans("", "", "0123456789_-'’.")  # what a word token holds besides letters

Signals = dict[str, float]
Result = tuple[Signals, str | None]


@dataclass(frozen=True)
class Scope:
    """Which rules a document's language admits (see the module docstring)."""

    word_rules: bool
    segmented: bool
    stop_words: frozenset[str] | None = None


class Parsed:
    """One document split once into the units the rules count."""

    def __init__(self, text: str):
        self.text = text
        self.lines = [s for s in (line.strip() for line in text.split("\n")) if s]
        self.paragraphs = [s for s in (p.strip() for p in _PARAGRAPH.split(text)) if s]

    @cached_property
    def words(self) -> list[str]:
        return _WORD.findall(self.text)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def _first(checks: list[tuple[str, bool]], family: str) -> str | None:
    for rule, failed in checks:
        if failed:
            return f"{family}:{rule}"
    return None


# --- Gopher quality (Rae et al. 2021, appendix A) -----------------------------------------


class GopherQualityConfig(Settings):
    """Gopher's quality rules; a None threshold turns its rule off."""

    enabled: bool = Field(True, description="Apply the Gopher quality rules.")
    min_words: int | None = Field(50, ge=1, description="Drop documents with fewer words (word rule).")
    max_words: int | None = Field(100_000, ge=1, description="Drop documents with more words (word rule).")
    min_mean_word_length: float | None = Field(
        3.0, ge=0, description="Drop documents whose mean word length is below this, in characters (word rule)."
    )
    max_mean_word_length: float | None = Field(
        10.0, ge=0, description="Drop documents whose mean word length is above this, in characters (word rule)."
    )
    max_hash_ratio: float | None = Field(0.1, ge=0, description="Drop documents with more '#' per word (word rule).")
    max_ellipsis_ratio: float | None = Field(
        0.1, ge=0, description="Drop documents with more '...' or '…' per word (word rule)."
    )
    max_bullet_lines: float | None = Field(
        0.9,
        ge=0,
        le=1,
        description="Drop documents where a larger fraction of lines starts with a bullet (•, -, *, ◦, ‣).",
    )
    max_ellipsis_lines: float | None = Field(
        0.3, ge=0, le=1, description="Drop documents where a larger fraction of lines ends with '...' or '…'."
    )
    min_alpha_words: float | None = Field(
        0.8, ge=0, le=1, description="Drop documents where a smaller fraction of words contains a letter (word rule)."
    )
    min_stop_words: int | None = Field(
        2,
        ge=1,
        description="Drop documents with fewer stop-word occurrences (word rule; only languages listed in stop_words).",
    )
    stop_words: dict[str, list[str]] = Field(
        default_factory=lambda: {"en": list(GOPHER_STOP_WORDS)},
        description="Stop words per language (ISO 639-1), matched case-insensitively. Gopher's English list by default.",
    )


def gopher_quality(doc: Parsed, cfg: GopherQualityConfig, scope: Scope) -> Result:
    """Gopher quality: word count and length, symbols per word, bullets, ellipses, alphabetic words, stop words."""
    lines = doc.lines
    s: Signals = {
        "bullet_lines": _ratio(sum(line.startswith(BULLETS) for line in lines), len(lines)),
        "ellipsis_lines": _ratio(sum(line.endswith(("...", "…")) for line in lines), len(lines)),
    }
    checks = []
    if scope.word_rules:
        words = doc.words
        n = len(words)
        s["words"] = n
        s["mean_word_length"] = _ratio(sum(map(len, words)), n)
        s["hash_ratio"] = _ratio(doc.text.count("#"), n)
        s["ellipsis_ratio"] = _ratio(doc.text.count("...") + doc.text.count("…"), n)
        s["alpha_words"] = _ratio(len(" ".join(words).translate(_NOT_LETTERS).split()), n)
        checks += [
            ("short_doc", cfg.min_words is not None and n < cfg.min_words),
            ("long_doc", cfg.max_words is not None and n > cfg.max_words),
            ("short_words", cfg.min_mean_word_length is not None and s["mean_word_length"] < cfg.min_mean_word_length),
            ("long_words", cfg.max_mean_word_length is not None and s["mean_word_length"] > cfg.max_mean_word_length),
            ("hash_ratio", cfg.max_hash_ratio is not None and s["hash_ratio"] > cfg.max_hash_ratio),
            ("ellipsis_ratio", cfg.max_ellipsis_ratio is not None and s["ellipsis_ratio"] > cfg.max_ellipsis_ratio),
        ]
    checks += [
        ("bullet_lines", cfg.max_bullet_lines is not None and s["bullet_lines"] > cfg.max_bullet_lines),
        ("ellipsis_lines", cfg.max_ellipsis_lines is not None and s["ellipsis_lines"] > cfg.max_ellipsis_lines),
    ]
    if scope.word_rules:
        checks.append(("alpha_words", cfg.min_alpha_words is not None and s["alpha_words"] < cfg.min_alpha_words))
        if scope.stop_words is not None:
            s["stop_words"] = sum(map(scope.stop_words.__contains__, " ".join(doc.words).lower().split()))
            checks.append(("stop_words", cfg.min_stop_words is not None and s["stop_words"] < cfg.min_stop_words))
    return s, _first(checks, "gopher_quality")


# --- Gopher repetition (Rae et al. 2021, table A1) ----------------------------------------


class GopherRepetitionConfig(Settings):
    """Gopher's repetition rules; a None threshold (or a missing n) turns its rule off."""

    enabled: bool = Field(True, description="Apply the Gopher repetition rules.")
    max_dup_lines: float | None = Field(
        0.3, ge=0, le=1, description="Drop documents where a larger fraction of lines repeats an earlier line."
    )
    max_dup_paragraphs: float | None = Field(
        0.3, ge=0, le=1, description="Drop documents where a larger fraction of paragraphs repeats an earlier one."
    )
    max_dup_line_chars: float | None = Field(
        0.2, ge=0, le=1, description="Drop documents where repeated lines hold a larger fraction of the characters."
    )
    max_dup_paragraph_chars: float | None = Field(
        0.2,
        ge=0,
        le=1,
        description="Drop documents where repeated paragraphs hold a larger fraction of the characters.",
    )
    top_ngram_chars: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> drop when the most frequent repeated word n-gram covers a larger fraction of word characters (segmented scripts).",
    )
    dup_ngram_chars: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> drop when repeats of earlier word n-grams cover a larger fraction of word characters (segmented scripts).",
    )

    @field_validator("top_ngram_chars", "dup_ngram_chars")
    @classmethod
    def _ngram_limits(cls, value: dict[int, float]) -> dict[int, float]:
        for n, frac in value.items():
            if not 1 <= n <= 20 or not 0 < frac <= 1:
                raise ValueError(f"n-gram {n}: need 1 <= n <= 20 and 0 < fraction <= 1, got {frac}")
        return value


def _ngram_stats(words: list[str], ns: set[int]) -> dict[tuple[str, int], float]:
    """Top and duplicated n-gram character fractions for each n in ``ns``.

    All n are done at once, in a constant number of numpy calls: each n-gram gets a
    64-bit polynomial hash of its word ids (tagged with n), one sort groups equal
    n-grams, and per-n results come from per-n rows. Two different n-grams
    share a hash with probability about 2^-64.
    """
    out = {(kind, k): 0.0 for k in ns for kind in ("top", "dup")}
    ns = sorted(k for k in ns if k < len(words))  # an n that fits only once cannot repeat
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    if not ns or not total:
        return out
    first_seen: dict[str, int] = {}  # word -> position of its first occurrence: equal words, equal ids
    ids = np.fromiter(map(first_seen.setdefault, words, range(len(words))), dtype=np.uint64, count=len(words))
    cum = np.concatenate([[0], np.cumsum(lengths)])
    keys, starts, tags = [], [], []
    h = ids
    for n in range(1, ns[-1] + 1):
        if n > 1:
            h = h[:-1] * _POLY + ids[n - 1 :]
        if n in ns:
            keys.append(h ^ _MIX[n])
            starts.append(np.arange(len(h)))
            tags.append(np.full(len(h), ns.index(n)))
    key, pos, tag = np.concatenate(keys), np.concatenate(starts), np.concatenate(tags)
    order = np.argsort(key)
    sk = key[order]
    new = np.concatenate([[True], sk[1:] != sk[:-1]])
    group = np.cumsum(new) - 1
    bounds = np.flatnonzero(new)
    counts = np.diff(np.append(bounds, len(sk)))[group]
    pos, tag = pos[order], tag[order]
    first = np.minimum.reduceat(pos, bounds)[group]  # where each n-gram first occurs
    width = np.array(ns)[tag]
    chars = cum[pos + width] - cum[pos]
    most = np.zeros(len(ns), dtype=np.int64)
    np.maximum.at(most, tag, counts)
    best = np.zeros(len(ns), dtype=np.int64)
    at_most = counts == most[tag]
    np.maximum.at(best, tag[at_most], chars[at_most])
    repeat = pos > first  # a later occurrence of an earlier n-gram
    cover = np.zeros((len(ns), len(words) + 1), dtype=np.int64)
    cover[tag[repeat], pos[repeat]] += 1  # (tag, pos) pairs are distinct: plain fancy indexing adds once each
    cover[tag[repeat], pos[repeat] + width[repeat]] -= 1
    covered = (np.cumsum(cover[:, :-1], axis=1) > 0) @ lengths
    for i, n in enumerate(ns):
        out["top", n] = min(1.0, int(most[i]) * int(best[i]) / total) if most[i] > 1 else 0.0
        out["dup", n] = int(covered[i]) / total
    return out


def gopher_repetition(doc: Parsed, cfg: GopherRepetitionConfig, scope: Scope) -> Result:
    """Gopher repetition: duplicate lines and paragraphs, top n-grams, duplicated n-grams."""
    n_chars = len(doc.text)
    dup_lines, dup_line_chars = _duplicates(doc.lines)
    dup_paras, dup_para_chars = _duplicates(doc.paragraphs)
    s: Signals = {
        "dup_paragraphs": _ratio(dup_paras, len(doc.paragraphs)),
        "dup_paragraph_chars": _ratio(dup_para_chars, n_chars),
        "dup_lines": _ratio(dup_lines, len(doc.lines)),
        "dup_line_chars": _ratio(dup_line_chars, n_chars),
    }
    checks = [
        ("dup_paragraphs", cfg.max_dup_paragraphs is not None and s["dup_paragraphs"] > cfg.max_dup_paragraphs),
        (
            "dup_paragraph_chars",
            cfg.max_dup_paragraph_chars is not None and s["dup_paragraph_chars"] > cfg.max_dup_paragraph_chars,
        ),
        ("dup_lines", cfg.max_dup_lines is not None and s["dup_lines"] > cfg.max_dup_lines),
        ("dup_line_chars", cfg.max_dup_line_chars is not None and s["dup_line_chars"] > cfg.max_dup_line_chars),
    ]
    if scope.segmented and (cfg.top_ngram_chars or cfg.dup_ngram_chars):
        stats = _ngram_stats(doc.words, set(cfg.top_ngram_chars) | set(cfg.dup_ngram_chars))
        for n, limit in sorted(cfg.top_ngram_chars.items()):
            s[f"top_{n}gram"] = stats["top", n]
            checks.append((f"top_{n}gram", stats["top", n] > limit))
        for n, limit in sorted(cfg.dup_ngram_chars.items()):
            s[f"dup_{n}gram"] = stats["dup", n]
            checks.append((f"dup_{n}gram", stats["dup", n] > limit))
    return s, _first(checks, "gopher_repetition")


# --- C4 (Raffel et al. 2020), document-level ----------------------------------------------


class C4Config(Settings):
    """C4's document-level rules (see the module docstring for what is on by default and why)."""

    enabled: bool = Field(True, description="Apply the C4 rules.")
    lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum' (placeholder text).")
    curly_brace: bool = Field(
        False,
        description="Drop documents containing '{' (C4's code filter; off: a technical corpus shows legitimate snippets).",
    )
    min_sentences: int | None = Field(5, ge=1, description="Drop documents with fewer sentences (segmented scripts).")
    terminal_punct: bool = Field(
        False,
        description="Count sentences only in lines ending in terminal punctuation, as C4's line filter would leave them (off, as in FineWeb).",
    )


def _ends_sentence(line: str) -> bool:
    return line.endswith(TERMINAL_PUNCT) and not line.endswith(("...", "…"))


def c4(doc: Parsed, cfg: C4Config, scope: Scope) -> Result:
    """C4: placeholder text, curly braces, too few sentences."""
    s: Signals = {"lorem_ipsum": int("lorem ipsum" in doc.text.lower()), "curly_brace": int("{" in doc.text)}
    checks = [
        ("lorem_ipsum", cfg.lorem_ipsum and bool(s["lorem_ipsum"])),
        ("curly_brace", cfg.curly_brace and bool(s["curly_brace"])),
    ]
    if scope.segmented:
        lines = [line for line in doc.lines if _ends_sentence(line)] if cfg.terminal_punct else doc.lines
        s["sentences"] = sum(len(_SENTENCE_END.findall(line)) for line in lines)
        checks.append(("min_sentences", cfg.min_sentences is not None and s["sentences"] < cfg.min_sentences))
    return s, _first(checks, "c4")


# --- FineWeb (Penedo et al. 2024, section 3.6) --------------------------------------------


class FineWebConfig(Settings):
    """FineWeb's custom rules, at the paper's thresholds."""

    enabled: bool = Field(True, description="Apply the FineWeb rules.")
    line_punct: float | None = Field(
        0.12,
        ge=0,
        le=1,
        description="Drop documents whose fraction of lines ending in punctuation is at most this (segmented scripts).",
    )
    dup_line_chars: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description="Drop documents where duplicated lines hold at least this fraction of characters (paper: 0.1; datatrove's default 0.01).",
    )
    short_line_chars: int = Field(30, ge=1, description="A line of at most this many characters is short.")
    short_lines: float | None = Field(
        0.67,
        ge=0,
        le=1,
        description="Drop documents where at least this fraction of lines is short (segmented scripts).",
    )
    newline_ratio: float | None = Field(
        None,
        ge=0,
        description="Drop documents with more newlines per word (datatrove's extra list rule, 0.3 there; not in the paper, so off).",
    )


def fineweb(doc: Parsed, cfg: FineWebConfig, scope: Scope) -> Result:
    """FineWeb: lines ending in punctuation, duplicated-line characters, short lines."""
    lines = doc.lines
    _, dup_chars = _duplicates(lines)
    s: Signals = {"dup_line_chars": _ratio(dup_chars, len(doc.text) - doc.text.count("\n"))}
    checks = []
    if scope.segmented:
        s["line_punct"] = _ratio(sum(line.endswith(TERMINAL_PUNCT) for line in lines), len(lines))
        s["short_lines"] = _ratio(sum(len(line) <= cfg.short_line_chars for line in lines), len(lines))
        s["newline_ratio"] = _ratio(doc.text.count("\n"), len(doc.words))
        checks += [
            ("line_punct", cfg.line_punct is not None and s["line_punct"] <= cfg.line_punct),
            ("short_lines", cfg.short_lines is not None and s["short_lines"] >= cfg.short_lines),
        ]
    checks.append(("dup_line_chars", cfg.dup_line_chars is not None and s["dup_line_chars"] >= cfg.dup_line_chars))
    if scope.segmented:
        checks.append(("newline_ratio", cfg.newline_ratio is not None and s["newline_ratio"] > cfg.newline_ratio))
    return s, _first(checks, "fineweb")
