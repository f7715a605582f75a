"""Shards stage: every document's tokens findable from its index row, splits, errors, catalog."""

import json
import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.artifact import Store, read_table
from storage.catalog import Catalog, register_dataset
from storage.documents import SplitConfig, make_doc_id, split_of
from storage.tokens import open_split
from tasks import shards, tokenizer
from tasks.parts.core import Execution
from tasks.stage import StageError

SPLIT = SplitConfig(val_fraction=0.2, seed=1)
WORDS = {
    "en": "web text becomes a small model after dedup and filtering".split(),
    "fr": "le texte du web devient un petit modèle après déduplication".split(),
    "es": "el texto de la web se convierte en un modelo pequeño".split(),
}


def make_docs(n=240, seed=0):
    """Originals with metadata columns, paraphrases of train docs, one of a val doc, an empty one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang = rng.choice(sorted(WORDS))
        text = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(5, 60)))
        if i % 31 == 0:
            text += " <|endoftext|> ¿qué? 😀"
        url = f"https://example.org/{i}"
        rows.append(
            {
                "doc_id": make_doc_id(url, text),
                "url": url,
                "source": "test",
                "fetched_at": "2026-11-01",
                "text": text,
                "lang": lang,
                "lang_score": round(rng.uniform(0.5, 1.0), 3),
                "signals": {"words": len(text.split()), "ratio": 0.5},
                "cluster_id": i // 3,
                "augmented_from": None,
            }
        )
    originals = list(rows)
    train = [r for r in originals if split_of(r["doc_id"], SPLIT) == "train"]
    val = [r for r in originals if split_of(r["doc_id"], SPLIT) == "val"]
    for src in train[::5] + val[:1]:
        text = " ".join(reversed(src["text"].split()))
        rows.append(
            {**src, "doc_id": make_doc_id(src["url"] + "#bt", text), "text": text, "augmented_from": src["doc_id"]}
        )
    rows.append({**rows[0], "doc_id": "empty", "text": ""})
    return rows


def publish(store, rows, key="docs"):
    with store.writer("filter", key) as w:
        for i in range(0, len(rows), 100):
            w.write_table(pa.Table.from_pylist(rows[i : i + 100]))
    return w.manifest


def build(store, rows, cfg=shards.ShardsConfig(), split=SPLIT, execution=None):
    docs = publish(store, rows)
    tok = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=600), docs=docs, split=split)
    return docs, tok, shards.run(store, cfg, docs=docs, tokenizer=tok, split=split, execution=execution)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store"))
    rows = make_docs()
    docs, tok, m = build(store, rows, shards.ShardsConfig(max_tokens_per_shard=2048, batch_size=64))
    return store, rows, tok, m


def test_every_index_row_points_at_its_documents_tokens(built):
    store, rows, tok, m = built
    text_of = {r["doc_id"]: r["text"] for r in rows}
    t = tokenizer.load_tokenizer(tok)
    index = read_table(m, "index")
    files = {s.name: s for split in ("train", "val") for s in open_split(m, split)}
    assert len(files) > 2  # small shards: the split rolled over
    for row in index.to_pylist():
        ids = files[row["shard"]].span(row["start"], row["n_tokens"]).tolist()
        assert ids[-1] == m.meta["eot_id"] == 0 and 0 not in ids[:-1]
        assert t.decode(ids[:-1]) == text_of[row["doc_id"]]
        assert row["n_bytes"] == len(text_of[row["doc_id"]].encode("utf-8"))
        assert row["shard"].startswith(f"tokens-{row['split']}-")
    for s in files.values():
        offsets = np.asarray(s.offsets)
        assert offsets[-1] == s.n_tokens and (np.diff(offsets) > 0).all()
        assert (np.asarray(s.tokens)[offsets[1:] - 1] == 0).all()  # EOT closes every document


def test_splits_are_deterministic_and_paraphrases_follow_their_source(built):
    store, rows, tok, m = built
    index = {r["doc_id"]: r for r in read_table(m, "index").to_pylist()}
    for r in rows:
        if r["doc_id"] in index:
            assert index[r["doc_id"]]["split"] == split_of(r["augmented_from"] or r["doc_id"], SPLIT)
    augmented = [r for r in index.values() if r["augmented_from"]]
    assert augmented and all(r["split"] == "train" for r in augmented)
    assert {reason: d["docs"] for reason, d in m.counters["dropped"].items()} == {
        "augmented_from_val": 1,
        "empty_text": 1,
    }
    assert len(index) == len(rows) - 2


def test_index_keeps_metadata_and_meta_adds_up(built):
    store, rows, tok, m = built
    index = read_table(m, "index")
    assert index.column_names == [
        "doc_id",
        "url",
        "source",
        "lang",
        "lang_score",
        "signals",
        "cluster_id",
        "augmented_from",
        "split",
        "shard",
        "start",
        "n_tokens",
        "n_bytes",
    ]
    first = index.to_pylist()[0]
    source = next(r for r in rows if r["doc_id"] == first["doc_id"])
    assert json.loads(first["signals"]) == source["signals"]
    assert first["cluster_id"] == str(source["cluster_id"]) and first["lang_score"] == source["lang_score"]
    assert m.meta["dtype"] == "uint16" and m.meta["vocab_size"] <= 600
    for split in ("train", "val"):
        part = index.filter(pc.equal(index["split"], split))
        assert m.meta["docs"][split] == part.num_rows == sum(s.n_docs for s in open_split(m, split))
        assert (
            m.meta["tokens"][split] == pc.sum(part["n_tokens"]).as_py() == sum(s.n_tokens for s in open_split(m, split))
        )
        assert m.meta["bytes"][split] == pc.sum(part["n_bytes"]).as_py()
    assert m.counters["tokens_out"] == sum(m.meta["tokens"].values())
    by_lang = index.group_by(["lang", "split"]).aggregate([("doc_id", "count")]).to_pylist()
    assert m.meta["languages"] == {
        lang: {
            s: next((r["doc_id_count"] for r in by_lang if r["lang"] == lang and r["split"] == s), 0)
            for s in ("train", "val")
        }
        for lang in WORDS
    }
    assert "languages_without_val" not in m.meta
    assert m.counters["docs_in"] == len(rows)


def test_registered_in_the_catalog_once(built):
    store, rows, tok, m = built
    docs = store.load("filter", "docs")
    again = shards.run(
        store, shards.ShardsConfig(max_tokens_per_shard=2048, batch_size=64), docs=docs, tokenizer=tok, split=SPLIT
    )
    assert again.created_at == m.created_at
    assert not store.catalog_path.exists()  # the stage writes no catalog: the flow that runs it does
    register_dataset(store, m)
    register_dataset(store, again)
    with Catalog(store.catalog_path, read_only=True) as cat:
        assert (
            cat.query("SELECT count(*) AS n FROM documents WHERE dataset = ?", [m.ref])["n"][0].as_py() == len(rows) - 2
        )
        assert sorted(cat.query("SELECT ref FROM artifacts")["ref"].to_pylist()) == sorted([m.ref, tok.ref, docs.ref])


def test_same_documents_give_byte_identical_shards(tmp_path):
    rows = make_docs(80)
    a = build(Store(tmp_path / "a"), rows)[2]
    b = build(Store(tmp_path / "b"), rows)[2]
    assert {f.path: f.sha256 for f in a.files} == {f.path: f.sha256 for f in b.files}


def test_the_same_shards_from_any_number_of_workers_and_after_a_killed_worker(tmp_path, monkeypatch, caplog):
    """Parts are encoded by workers and placed in artifact order: the bytes do not depend on
    who encoded them, and a worker SIGKILLed with part 1 encoded but not published costs that part."""
    rows, cfg = make_docs(), shards.ShardsConfig(max_tokens_per_shard=2048, batch_size=64)
    one = build(Store(tmp_path / "one"), rows, cfg, execution=Execution(workers=1))[2]
    monkeypatch.setenv("LMFORGE_KILL_AT", "shards/encode/1")
    monkeypatch.setenv("LMFORGE_KILL_MARKER", str(tmp_path / "killed"))
    logging.getLogger("lmforge.shards").addHandler(caplog.handler)  # Prefect may stop lmforge loggers propagating
    try:
        two = build(Store(tmp_path / "two"), rows, cfg, execution=Execution(workers=2))[2]
    finally:
        logging.getLogger("lmforge.shards").removeHandler(caplog.handler)
    assert (tmp_path / "killed").read_text().startswith("shards/encode/1 ")
    assert one.meta["execution"]["parts"] == 3 and len(one.files_with_prefix("tokens-train-")) > 2
    assert {f.path: f.sha256 for f in one.files} == {f.path: f.sha256 for f in two.files}
    assert (one.meta["execution"]["workers"], two.meta["execution"]["workers"]) == (1, 2)
    assert two.meta["execution"]["retried_parts"] == ["encode part-00001.parquet"]
    assert "the worker on part-00001.parquet died (exit code -9); retrying that part alone" in caplog.text
    assert not (tmp_path / "two" / "_work" / "shards" / two.key).exists()


def test_each_part_is_encoded_into_shards_of_its_own(tmp_path):
    """The driver links the parts' shards and copies no token: no shard holds two input parts'
    documents, and a split's shards read one after the other are its documents' tokens in
    artifact order (the one sequence pretraining samples from)."""
    rows, cfg = make_docs(), shards.ShardsConfig(max_tokens_per_shard=2048, batch_size=64)
    docs, _, m = build(Store(tmp_path), rows, cfg)
    part_of = {
        doc_id: f.path
        for f in docs.files_with_prefix("part-")
        for doc_id in pq.read_table(docs.path(f.path), columns=["doc_id"])["doc_id"].to_pylist()
    }
    index = read_table(m, "index").to_pylist()
    parts_in_shard: dict[str, set] = {}
    for row in index:
        parts_in_shard.setdefault(row["shard"], set()).add(part_of[row["doc_id"]])
    assert all(len(parts) == 1 for parts in parts_in_shard.values())
    assert set().union(*parts_in_shard.values()) == {f.path for f in docs.files_with_prefix("part-")} != set()
    for split in ("train", "val"):
        shards_in_order = open_split(m, split)
        by_name = {s.name: s for s in shards_in_order}
        stream = np.concatenate([np.asarray(s.tokens) for s in shards_in_order])
        docs_in_order = [by_name[r["shard"]].span(r["start"], r["n_tokens"]) for r in index if r["split"] == split]
        assert np.array_equal(stream, np.concatenate(docs_in_order))


def test_missing_metadata_columns_become_nulls(tmp_path):
    rows = [
        {k: r[k] for k in ("doc_id", "url", "source", "fetched_at", "text")}
        for r in make_docs(80)
        if not r["augmented_from"]
    ]
    m = build(Store(tmp_path), rows)[2]
    index = read_table(m, "index")
    for col in ("lang", "lang_score", "signals", "cluster_id", "augmented_from"):
        assert index[col].null_count == index.num_rows


def test_empty_train_split_names_the_filter(tmp_path):
    store = Store(tmp_path)
    rows = make_docs(60)
    docs = publish(store, rows)
    tok = tokenizer.run(store, tokenizer.TokenizerConfig(vocab_size=600), docs=docs, split=SPLIT)
    empty = publish(store, [{**r, "text": ""} for r in rows], key="empty")
    with pytest.raises(StageError, match=r"\[shards\].*train split is empty.*relax filter.languages"):
        shards.run(store, shards.ShardsConfig(), docs=empty, tokenizer=tok, split=SPLIT)
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


def test_empty_validation_split_asks_for_a_larger_val_fraction(tmp_path):
    rows = [r for r in make_docs(60) if not r["augmented_from"]]
    no_val = SplitConfig(val_fraction=0.0)
    with pytest.raises(StageError, match=r"validation split is empty.*raise split.val_fraction"):
        build(Store(tmp_path), rows, split=no_val)


def test_a_language_without_validation_documents_is_named(tmp_path, caplog):
    """Every Spanish page lands in train: a warning and the meta say evaluation will not see Spanish."""
    rows = [r for r in make_docs(120) if not r["augmented_from"] and r["text"]]
    rows = [r for r in rows if r["lang"] != "es" or split_of(r["doc_id"], SPLIT) == "train"]
    with caplog.at_level("WARNING", logger="lmforge.shards"):
        m = build(Store(tmp_path), rows)[2]
    assert m.meta["languages_without_val"] == ["es"]
    assert m.meta["languages"]["es"]["val"] == 0 < m.meta["languages"]["es"]["train"]
    assert any("'es'" in r.message and "raise split.val_fraction" in r.message for r in caplog.records), caplog.text
