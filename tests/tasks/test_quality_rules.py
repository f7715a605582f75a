"""Quality rules: for every rule, a document crafted to trip it and one that passes; scopes; exact numbers."""

import random
from collections import Counter

import pytest

from tasks.text.quality_rules import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    Parsed,
    Scope,
    _ngram_stats,
    c4,
    fineweb,
    gopher_quality,
    gopher_repetition,
)

EN = Scope(
    word_rules=True, segmented=True, stop_words=frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
)
OTHER = Scope(word_rules=False, segmented=True)  # e.g. French with quality_languages=["en"]
UNSEGMENTED = Scope(word_rules=False, segmented=False)  # e.g. Japanese

GOOD = """The project builds a small language model from web text. It collects pages, removes duplicates and filters them by language.
Each stage of the pipeline writes an artifact to the store, and the next stage reads it. A stage that fails can be run again from the cache.
The tokenizer is trained on the training split only, so that the validation text stays unseen by the model during training.
We measure the quality of the model with held-out data and export it to a format that runs on a small server without a GPU.
This is the last sentence of the document, and it has enough words to pass the rules that count words and sentences."""

NOUNS = (
    "apple banana cherry window garden pencil rocket silver forest meadow river candle basket marble "
    "engine harbor violin planet pillow carpet ladder mirror button rabbit saddle tunnel wallet"
).split()


def long_lines(n, tail="."):
    """n distinct lines of ordinary English, each longer than 30 characters."""
    return "\n".join(f"The {NOUNS[i]} in this example line stands next to the {NOUNS[-1 - i]}{tail}" for i in range(n))


FAMILIES = {
    "gopher_quality": (gopher_quality, GopherQualityConfig),
    "gopher_repetition": (gopher_repetition, GopherRepetitionConfig),
    "c4": (c4, C4Config),
    "fineweb": (fineweb, FineWebConfig),
}


def check(family, text, scope=EN, **cfg):
    fn, config = FAMILIES[family]
    return fn(Parsed(text), config(**cfg), scope)


def test_good_document_passes_every_family():
    for family in FAMILIES:
        signals, reason = check(family, GOOD)
        assert reason is None, (family, signals)


GOPHER_QUALITY_TRIPS = {
    "short_doc": "The cat sat with the dog and that was all.",
    "long_doc": "the cat " * 50_001,
    "short_words": " ".join(["a", "to", "of", "be"] * 15),
    "long_words": " ".join(["internationalization", "standardization", "with", "the"] * 15),
    "hash_ratio": GOOD.replace("web text.", "web text." + " #tag" * 15),
    "ellipsis_ratio": GOOD.replace("web text.", "web text" + " and then..." * 15 + "."),
    "bullet_lines": "\n".join(f"- The {n} is one item of the list, and that is fine with me." for n in NOUNS[:10]),
    "ellipsis_lines": GOOD.replace("language.\n", "language...\n").replace("cache.\n", "cache...\n"),
    "alpha_words": GOOD + " " + " ".join(str(10 + i) for i in range(40)) + ".",
    "stop_words": " ".join(NOUNS * 3) + ".",
}


@pytest.mark.parametrize("rule", sorted(GOPHER_QUALITY_TRIPS))
def test_gopher_quality_rule_trips(rule):
    signals, reason = check("gopher_quality", GOPHER_QUALITY_TRIPS[rule])
    assert reason == f"gopher_quality:{rule}", signals


def test_gopher_quality_numbers_and_disabling():
    signals, _ = check("gopher_quality", "The cat, the dog and the #bird went home... It is 2024.")
    assert signals["words"] == 12  # punctuation and '#' are not words; "2024" is
    assert signals["stop_words"] == 4  # "The", "the", "and", "the": case-insensitive occurrences
    assert signals["alpha_words"] == pytest.approx(11 / 12)
    assert signals["hash_ratio"] == pytest.approx(1 / 12)
    assert signals["ellipsis_ratio"] == pytest.approx(1 / 12)
    assert check("gopher_quality", GOPHER_QUALITY_TRIPS["short_doc"], min_words=None, min_stop_words=None)[1] is None


def test_word_rules_only_for_quality_languages():
    short_french = "Le chat dort. Le chien court."
    signals, reason = check("gopher_quality", short_french, scope=OTHER)
    assert reason is None and "words" not in signals and "stop_words" not in signals
    # A quality language without a stop-word list gets the other word rules but not that one.
    signals, reason = check(
        "gopher_quality", short_french, scope=Scope(word_rules=True, segmented=True, stop_words=None)
    )
    assert reason == "gopher_quality:short_doc" and "stop_words" not in signals


GOPHER_REPETITION_TRIPS = {
    "dup_paragraphs": "One paragraph of text here.\n\nAnother paragraph.\n\nOne paragraph of text here.\n\nOne paragraph of text here.",
    "dup_paragraph_chars": "\n\n".join([long_lines(3)] + [f"Short {n}." for n in NOUNS[:6]] + [long_lines(3)]),
    "dup_lines": "Line one is here.\nLine two.\nLine one is here.\nLine one is here.",
    "dup_line_chars": "\n".join([long_lines(1)] + [f"Short {n}." for n in NOUNS[:6]] + [long_lines(1)]),
}


@pytest.mark.parametrize("rule", sorted(GOPHER_REPETITION_TRIPS))
def test_gopher_repetition_line_rule_trips(rule):
    signals, reason = check("gopher_repetition", GOPHER_REPETITION_TRIPS[rule], scope=UNSEGMENTED)
    assert reason == f"gopher_repetition:{rule}", signals


@pytest.mark.parametrize("n", [2, 3, 4])
def test_gopher_top_ngram_rule_trips(n):
    phrase = " ".join(NOUNS[:n])
    text = "\n".join(f"{phrase} {w}." for w in NOUNS[n : n + 8])  # distinct lines, one frequent n-gram
    cfg = {"top_ngram_chars": {n: 0.2}, "dup_ngram_chars": {}}
    assert check("gopher_repetition", text, **cfg)[1] == f"gopher_repetition:top_{n}gram"
    assert check("gopher_repetition", GOOD, **cfg)[1] is None


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_gopher_dup_ngram_rule_trips(n):
    phrase = " ".join(NOUNS[:10])
    text = f"First {phrase} stop.\nSecond line with other words {phrase} end."
    cfg = {"top_ngram_chars": {}, "dup_ngram_chars": {n: 0.1}}
    assert check("gopher_repetition", text, **cfg)[1] == f"gopher_repetition:dup_{n}gram"
    assert check("gopher_repetition", GOOD, **cfg)[1] is None


def test_ngram_numbers():
    stats = _ngram_stats("a b c d e a b c d e".split(), {2, 5})
    assert stats["dup", 5] == pytest.approx(0.5)  # the second "a b c d e" repeats the first
    assert stats["top", 2] == pytest.approx(2 * 2 / 10)  # "a b" twice, 2 chars each, of 10
    assert _ngram_stats("one two three four".split(), {2})["top", 2] == 0.0  # nothing repeats


def naive_ngram_stats(words, n):
    """Straightforward reference: Counter for the top n-gram, a coverage mask for repeats."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    total = sum(map(len, words))
    counts = Counter(grams)
    most = max(counts.values())
    top = most * max(sum(map(len, g)) for g, c in counts.items() if c == most) if most > 1 else 0
    covered, seen = [False] * len(words), set()
    for i, g in enumerate(grams):
        if g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    return min(1.0, top / total), sum(len(w) for w, c in zip(words, covered) if c) / total


def test_ngram_stats_match_a_naive_count():
    rng = random.Random(0)
    for trial in range(20):
        words = [rng.choice(NOUNS[: 3 + trial]) for _ in range(rng.randint(12, 200))]
        stats = _ngram_stats(words, set(range(2, 11)))
        for n in range(2, 11):
            top, dup = naive_ngram_stats(words, n)
            assert (stats["top", n], stats["dup", n]) == (pytest.approx(top), pytest.approx(dup)), (trial, n)


def test_ngram_rules_skip_unsegmented_scripts():
    japanese = "これは日本語の文章です。\n同じ言葉が続きます。\n最後の行です。"
    signals, reason = check("gopher_repetition", japanese, scope=UNSEGMENTED)
    assert reason is None and not any(k.startswith(("top_", "dup_5")) for k in signals)


def test_c4_rules():
    assert check("c4", GOOD + " Lorem ipsum dolor sit amet.")[1] == "c4:lorem_ipsum"
    braces = GOOD + " Use {braces} in the config."
    assert check("c4", braces)[1] is None  # off by default: technical text shows snippets
    assert check("c4", braces, curly_brace=True)[1] == "c4:curly_brace"
    few = "This is one. This is two! Is this three? Four."
    signals, reason = check("c4", few)
    assert (signals["sentences"], reason) == (4, "c4:min_sentences")
    assert check("c4", few, min_sentences=4)[1] is None
    assert check("c4", few, scope=UNSEGMENTED)[1] is None  # Thai, Chinese...: no sentence count


def test_c4_terminal_punct_counts_only_punctuated_lines():
    text = "One is here. Two is here. Three is here. Four\nFive is here. Six is here. Seven"
    signals, reason = check("c4", text)
    assert (signals["sentences"], reason) == (5, None)
    signals, reason = check("c4", text, terminal_punct=True)
    assert (signals["sentences"], reason) == (0, "c4:min_sentences")


FINEWEB_TRIPS = {
    "line_punct": (long_lines(10, tail=""), {}),
    "short_lines": ("\n".join(f"A short {n}." for n in NOUNS[:10]), {}),
    "dup_line_chars": ("\n".join([long_lines(8)] + long_lines(2).split("\n")), {}),
    "newline_ratio": (
        "\n".join(f"Internationalization-standardization {n}." for n in NOUNS[:10]),
        {"newline_ratio": 0.3},
    ),
}


@pytest.mark.parametrize("rule", sorted(FINEWEB_TRIPS))
def test_fineweb_rule_trips(rule):
    text, cfg = FINEWEB_TRIPS[rule]
    signals, reason = check("fineweb", text, **cfg)
    assert reason == f"fineweb:{rule}", signals
    assert check("fineweb", GOOD, **cfg)[1] is None


def test_fineweb_thresholds_are_the_papers():
    cfg = FineWebConfig()
    assert (cfg.line_punct, cfg.dup_line_chars, cfg.short_lines, cfg.newline_ratio) == (0.12, 0.1, 0.67, None)
    # A duplicated-line share between datatrove's 0.01 and the paper's 0.1 passes.
    text = long_lines(20) + "\n" + long_lines(1)
    signals, reason = check("fineweb", text)
    assert 0.01 < signals["dup_line_chars"] < 0.1 and reason is None
