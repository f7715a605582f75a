"""Tokenizer stage: byte-level round trip, EOT id, train split only, caps and errors."""

import random

import pyarrow as pa
import pytest

from storage.artifact import Store
from storage.documents import SplitConfig, make_doc_id, split_of
from tasks import tokenizer
from tasks.parts.core import Execution
from tasks.stage import StageError
from tasks.text import tokenizer_sample

SPLIT = SplitConfig(val_fraction=0.2, seed=3)
WORDS = {
    "en": "the model learns language from text collected on the web every night".split(),
    "fr": "le modèle apprend la langue à partir du texte collecté été très".split(),
    "de": "das Modell lernt Sprache aus Texten über Größe und Straße".split(),
    "ja": "言語 モデル は ウェブ の テキスト から 毎晩 学ぶ".split(),
}
TRAIN_MARK, VAL_MARK = "kktrainonlyww", "qqvalonlyzz"  # words seen only in one split


def make_docs(n=300, seed=0):
    """Originals in four languages, split markers, odd characters, and paraphrases of train docs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang = rng.choice(sorted(WORDS))
        text = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(20, 80)))
        if i % 29 == 0:
            text += " naïve café 🙂\tend\n\n  <|endoftext|> ﬁ\u200b"
        url = f"https://example.org/{lang}/{i}"
        doc_id = make_doc_id(url, text)
        text += f" {TRAIN_MARK if split_of(doc_id, SPLIT) == 'train' else VAL_MARK}" * 5
        rows.append({"doc_id": doc_id, "url": url, "text": text, "lang": lang, "augmented_from": None})
    for row in rows[::4]:
        if split_of(row["doc_id"], SPLIT) == "train":
            text = " ".join(reversed(row["text"].split()))
            rows.append(
                {
                    "doc_id": make_doc_id(row["url"] + "#bt", text),
                    "url": row["url"],
                    "text": text,
                    "lang": row["lang"],
                    "augmented_from": row["doc_id"],
                }
            )
    return rows


def publish_docs(store, rows, key="docs"):
    full = [{"source": "test", "fetched_at": "2026-11-01T00:00:00Z", **r} for r in rows]
    with store.writer("filter", key) as w:
        for i in range(0, len(full), 128):
            w.write_table(pa.Table.from_pylist(full[i : i + 128]))
    return w.manifest


def test_byte_level_round_trip_and_eot_id(tmp_path):
    store = Store(tmp_path)
    rows = make_docs()
    m = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=1024), docs=publish_docs(store, rows), split=SPLIT)
    tok = tokenizer.load_tokenizer(m)
    assert m.meta["eot_id"] == 0 == tok.token_to_id("<|endoftext|>")
    assert m.meta["eot_token"] == "<|endoftext|>"
    assert m.meta["vocab_size"] == tok.get_vocab_size() <= 1024
    assert [f.path for f in m.files] == ["tokenizer.json"]
    for row in rows:
        ids = tok.encode(row["text"]).ids
        assert tok.decode(ids) == row["text"]
        assert 0 not in ids  # a literal "<|endoftext|>" in the text stays text
    unseen = "Ωμέγα ✓ 中文 \x00 ünïcödé"  # characters never seen in training: bytes still cover them
    assert tok.decode(tok.encode(unseen).ids) == unseen


def test_trains_on_the_train_split_only(tmp_path):
    store = Store(tmp_path)
    rows = make_docs()
    m = tokenizer.run(
        store, tokenizer.TokenizerConfig(vocab_size=2048, min_frequency=2), docs=publish_docs(store, rows), split=SPLIT
    )
    train = [r for r in rows if split_of(r["augmented_from"] or r["doc_id"], SPLIT) == "train"]
    assert 0 < len(train) < len(rows)
    assert any(r["augmented_from"] for r in train)
    assert m.meta["train_docs"] == m.counters["train_docs"] == len(train)
    assert m.meta["train_chars"] == sum(len(r["text"]) for r in train)
    vocab = tokenizer.load_tokenizer(m).get_vocab()
    assert any(TRAIN_MARK in t for t in vocab)
    assert not any("qq" in t for t in vocab)  # the val-only word taught the vocabulary nothing


def test_same_input_gives_the_same_tokenizer_and_a_rerun_is_a_cache_hit(tmp_path):
    rows = make_docs(120)
    made = []
    for name in ("a", "b"):
        store = Store(tmp_path / name)
        docs = publish_docs(store, rows)
        m = tokenizer.run(store, tokenizer.TokenizerConfig(), docs=docs, split=SPLIT)
        assert tokenizer.run(store, tokenizer.TokenizerConfig(), docs=docs, split=SPLIT).created_at == m.created_at
        made.append(m)
    assert made[0].path("tokenizer.json").read_bytes() == made[1].path("tokenizer.json").read_bytes()


def test_max_train_chars_takes_whole_documents_of_the_lowest_ranks_from_every_part(tmp_path):
    store = Store(tmp_path)
    rows = make_docs()
    cfg = tokenizer.TokenizerConfig(max_train_chars=20_000)
    m = tokenizer.run(store, cfg, docs=publish_docs(store, rows), split=SPLIT)
    train = [r for r in rows if split_of(r["augmented_from"] or r["doc_id"], SPLIT) == "train"]
    n = m.meta["sample"]["buckets"]
    chosen = [r for r in train if tokenizer_sample.bucket_of(r["doc_id"], 0) < n]
    assert m.counters["train_capped"] is True and m.meta["sample"]["split_chars"] == sum(len(r["text"]) for r in train)
    assert (m.meta["train_docs"], m.meta["train_chars"]) == (len(chosen), sum(len(r["text"]) for r in chosen))
    longest = max(len(r["text"]) for r in train)
    assert 20_000 - longest < m.meta["train_chars"] <= 20_000  # whole documents, up to the first that does not fit
    assert {rows.index(r) // 128 for r in chosen} == {0, 1, 2}  # every part of the input gives documents


def test_the_sample_is_the_same_whatever_the_parts_and_the_workers(tmp_path):
    rows, cfg = make_docs(), tokenizer.TokenizerConfig(max_train_chars=30_000)
    one = Store(tmp_path / "one")
    a = tokenizer.run(one, cfg, docs=publish_docs(one, rows), split=SPLIT, execution=Execution(workers=1))
    two = Store(tmp_path / "two")
    with two.writer("filter", "docs") as w:  # one part instead of three
        w.write_table(
            pa.Table.from_pylist([{"source": "test", "fetched_at": "2026-11-01T00:00:00Z", **r} for r in rows])
        )
    b = tokenizer.run(two, cfg, docs=w.manifest, split=SPLIT, execution=Execution(workers=2))
    assert a.meta["execution"]["parts"] == 3 and b.meta["execution"]["parts"] == 1
    assert a.path("tokenizer.json").read_bytes() == b.path("tokenizer.json").read_bytes()
    assert (
        a.meta["train_docs"] == b.meta["train_docs"] and not (tmp_path / "one" / "_work" / "tokenizer" / a.key).exists()
    )


def test_without_a_cap_every_training_document_is_used(tmp_path):
    store = Store(tmp_path)
    rows = make_docs()
    m = tokenizer.run(
        store, tokenizer.TokenizerConfig(max_train_chars=None), docs=publish_docs(store, rows), split=SPLIT
    )
    train = [r for r in rows if split_of(r["augmented_from"] or r["doc_id"], SPLIT) == "train"]
    assert (m.meta["train_docs"], m.counters["train_capped"]) == (len(train), False)
    assert m.meta["sample"] == {
        "buckets": tokenizer_sample.BUCKETS,
        "of": tokenizer_sample.BUCKETS,
        "split_chars": None,
    }
    assert m.meta["execution"] is None  # nothing measured: no worker started


def test_a_cap_below_every_document_is_refused(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(
        StageError,
        match=r"config.max_train_chars.*no training document fits in 1 characters.*raise tokenizer.max_train_chars",
    ):
        tokenizer.run(
            store, tokenizer.TokenizerConfig(max_train_chars=1), docs=publish_docs(store, make_docs()), split=SPLIT
        )


def test_documents_without_augmented_from_column(tmp_path):
    store = Store(tmp_path)
    rows = [{k: v for k, v in r.items() if k != "augmented_from"} for r in make_docs(60) if not r["augmented_from"]]
    m = tokenizer.run(store, tokenizer.TokenizerConfig(), docs=publish_docs(store, rows), split=SPLIT)
    assert m.meta["train_docs"] == sum(split_of(r["doc_id"], SPLIT) == "train" for r in rows)


def test_an_empty_training_set_is_a_stage_error(tmp_path):
    store = Store(tmp_path)
    rows = [{"doc_id": f"d{i}", "url": f"u{i}", "text": "", "lang": "en", "augmented_from": None} for i in range(20)]
    with pytest.raises(StageError, match=r"\[tokenizer\].*no non-empty training-split document"):
        tokenizer.run(store, tokenizer.TokenizerConfig(), docs=publish_docs(store, rows), split=SPLIT)
    assert not (tmp_path / "tokenizer").exists() or not any((tmp_path / "tokenizer").iterdir())


def test_a_filter_that_kept_nothing_is_named(tmp_path):
    store = Store(tmp_path)
    with store.writer("filter", "none") as w:
        w.write_table(pa.table({"doc_id": ["a"], "text": ["x"], "dropped_reason": ["language"]}), "dropped")
    with pytest.raises(StageError, match=r"no part-\*.parquet.*relax filter.languages or filter.min_lang_score"):
        tokenizer.run(store, tokenizer.TokenizerConfig(), docs=w.manifest, split=SPLIT)


def test_documents_without_text_column_are_refused(tmp_path):
    store = Store(tmp_path)
    with store.writer("filter", "notext") as w:
        w.write_table(pa.table({"doc_id": ["a"], "url": ["u"]}))
    with pytest.raises(StageError, match=r"lack column\(s\) \['text'\]"):
        tokenizer.run(store, tokenizer.TokenizerConfig(), docs=w.manifest, split=SPLIT)


def test_config_rejects_unknown_and_out_of_range_fields():
    with pytest.raises(ValueError):
        tokenizer.TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError):
        tokenizer.TokenizerConfig(vocab=8192)
