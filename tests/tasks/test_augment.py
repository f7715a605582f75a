"""Augment stage with the Apertium backend: choice of documents, split safety, chrF band, caching."""

import itertools
import logging
import random
import shutil

import pyarrow as pa
import pytest
from pydantic import ValidationError

from storage.artifact import Store, read_table
from storage.documents import SplitConfig, make_doc_id, split_of
from tasks import augment
from tasks.augment import AugmentConfig, selection_rank, text_prefix
from tasks.parts.core import Execution
from tasks.stage import StageError
from tests.tasks.sentences import EN

ES = [
    "Los agricultores del valle cultivan manzanas, peras y ciruelas en pequeñas parcelas familiares.",
    "Ella escribió una carta larga a su hermano, que vive al otro lado del océano.",
    "El tren a la capital llegó tarde por la nieve que cubría las vías.",
    "Los niños aprenden a leer más rápido cuando sus padres les leen cuentos por la noche.",
    "El comité publicará su informe sobre la calidad del agua la próxima semana.",
    "Los científicos midieron la temperatura del lago cada día durante un año.",
]
FR = ["Le marché du samedi attire beaucoup de monde sur la place du village."]
NAMES_ONLY = "Debian 11 Bullseye, Linux 5.10, GNOME 3.38, Python 3.9, GCC 10.2."  # a round trip leaves it as is

SPLIT = SplitConfig(val_fraction=0.25, seed=3)
WIDE = dict(chrf_min=0.0, chrf_max=100.0)

pytestmark = pytest.mark.skipif(
    shutil.which("apertium") is None, reason="Debian packages apertium + apertium-eng-spa not installed"
)


def make_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang, bank = [("en", EN), ("es", ES), ("fr", FR)][i % 3 if i % 10 else 2]
        text = "\n\n".join(" ".join(rng.sample(bank, min(2, len(bank)))) for _ in range(2))
        url = f"http://127.0.0.1:8000/{lang}/page-{i}.html"
        rows.append(
            dict(
                doc_id=make_doc_id(url, text),
                url=url,
                source="crawl",
                fetched_at="2026-11-01T00:00:00Z",
                text=text,
                lang=lang,
                lang_score=0.95,
            )
        )
    return rows


def publish(store: Store, rows: list[dict], key: str = "input", part_rows: int | None = None):
    """The rows as a filter artifact, in parts of ``part_rows`` (default: one part)."""
    size = part_rows or max(len(rows), 1)
    with store.writer("filter", key) as w:
        for i in range(0, len(rows), size):
            w.write_table(pa.Table.from_pylist(rows[i : i + size]))
    return w.manifest


def train_id(name: str) -> str:
    """A doc_id starting with name that the split puts in train."""
    return next(f"{name}-{i}" for i in itertools.count() if split_of(f"{name}-{i}", SPLIT) == "train")


def is_eligible(row: dict, cfg: AugmentConfig) -> bool:
    return row["lang"] in cfg.pivots and split_of(row["doc_id"], SPLIT) == "train"


def test_fraction_split_and_tags(tmp_path):
    rows = make_docs(90)
    store = Store(tmp_path)
    cfg = AugmentConfig(fraction=0.5, **WIDE)
    m = augment.run(store, cfg, publish(store, rows), SPLIT)

    eligible = [r for r in rows if is_eligible(r, cfg)]
    expected = {r["doc_id"] for r in eligible if selection_rank(r["doc_id"], cfg.seed) < 0.5}
    val = {r["doc_id"] for r in rows if split_of(r["doc_id"], SPLIT) == "val"}
    stats = m.counters["augment"]
    assert stats["eligible"] == len(eligible) and stats["val_skipped"] == sum(
        r["lang"] != "fr" for r in rows if r["doc_id"] in val
    )
    assert stats["candidates"] == stats["accepted"] == len(expected)
    assert 0.3 * len(eligible) < len(expected) < 0.7 * len(eligible) and val

    out = read_table(m).to_pylist()
    originals = [r for r in out if r["augmented_from"] is None]
    new = [r for r in out if r["augmented_from"] is not None]
    assert originals == [{**r, "augmented_from": None, "chrf": None} for r in rows]
    assert {r["augmented_from"] for r in new} == expected
    assert not {r["augmented_from"] for r in new} & val
    by_id = {r["doc_id"]: r for r in rows}
    for r in new:
        src = by_id[r["augmented_from"]]
        pivot = cfg.pivots[src["lang"]]
        assert (r["url"], r["lang"], r["fetched_at"]) == (src["url"], src["lang"], src["fetched_at"])
        assert r["source"] == f"backtranslation:apertium:{src['lang']}-{pivot}-{src['lang']}"
        assert r["doc_id"] == make_doc_id(src["url"] + "#bt-" + pivot, r["text"])
        assert r["text"] != src["text"] and r["lang_score"] is None and 0 <= r["chrf"] <= 100
    assert m.counters["docs_in"] == len(rows) and m.counters["docs_out"] == len(rows) + len(new)
    assert m.meta["words_per_s"] > 0 and stats["words_translated"] > 0


def test_validation_docs_never_augmented_even_at_fraction_one(tmp_path):
    rows = make_docs(40, seed=1)
    store = Store(tmp_path)
    cfg = AugmentConfig(fraction=1.0, **WIDE)
    m = augment.run(store, cfg, publish(store, rows), SPLIT)
    sources = {r["augmented_from"] for r in read_table(m).to_pylist() if r["augmented_from"]}
    assert sources == {r["doc_id"] for r in rows if is_eligible(r, cfg)}
    assert all(split_of(s, SPLIT) == "train" for s in sources)


def test_max_docs_keeps_the_lowest_ranks(tmp_path):
    rows = make_docs(40, seed=2)
    store = Store(tmp_path)
    cfg = AugmentConfig(fraction=1.0, max_docs=4, **WIDE)
    m = augment.run(store, cfg, publish(store, rows), SPLIT)
    lowest = sorted((selection_rank(r["doc_id"], 0), r["doc_id"]) for r in rows if is_eligible(r, cfg))[:4]
    sources = {r["augmented_from"] for r in read_table(m).to_pylist() if r["augmented_from"]}
    assert sources == {d for _, d in lowest}


def test_parts_choose_the_artifacts_lowest_ranks(tmp_path):
    """max_docs is over the whole artifact, not per part: the lowest ranks may all sit in one part."""
    rows = make_docs(60, seed=7)
    store = Store(tmp_path)
    cfg = AugmentConfig(fraction=1.0, max_docs=5, **WIDE)
    m = augment.run(store, cfg, publish(store, rows, part_rows=7), SPLIT)
    lowest = sorted((selection_rank(r["doc_id"], 0), r["doc_id"]) for r in rows if is_eligible(r, cfg))[:5]
    out = read_table(m).to_pylist()
    assert {r["augmented_from"] for r in out if r["augmented_from"]} == {d for _, d in lowest}
    assert [r for r in out if r["augmented_from"] is None] == [
        {**r, "augmented_from": None, "chrf": None} for r in rows
    ]
    assert m.meta["execution"]["parts"] == 9 and len(m.files_with_prefix("part-")) == 9


def test_the_same_artifact_from_any_number_of_workers_and_after_a_killed_worker(tmp_path, monkeypatch, caplog):
    """Output part N is input part N and its paraphrases: the files do not depend on who translated
    them, and a worker SIGKILLed with part 1 translated but not published costs that part."""
    rows, cfg = make_docs(48, seed=8), AugmentConfig(fraction=0.6, chrf_min=0.0, chrf_max=78.0)
    one_store, two_store = Store(tmp_path / "one"), Store(tmp_path / "two")
    one = augment.run(one_store, cfg, publish(one_store, rows, part_rows=12), SPLIT, execution=Execution(workers=1))
    monkeypatch.setenv("LMFORGE_KILL_AT", "augment/translate/1")
    monkeypatch.setenv("LMFORGE_KILL_MARKER", str(tmp_path / "killed"))
    logging.getLogger("lmforge.augment").addHandler(caplog.handler)  # Prefect may stop lmforge loggers propagating
    try:
        docs = publish(two_store, rows, part_rows=12)
        two = augment.run(two_store, cfg, docs, SPLIT, execution=Execution(workers=2))
    finally:
        logging.getLogger("lmforge.augment").removeHandler(caplog.handler)
    assert (tmp_path / "killed").read_text().startswith("augment/translate/1 ")
    assert one.key == two.key and one.digest() == two.digest()
    assert one.counters == two.counters and one.counters["augment"]["accepted"] > 4
    assert len(one.files_with_prefix("part-")) == 4 and one.files_with_prefix("dropped-")
    assert two.meta["execution"]["retried_parts"] == ["translate part-00001.parquet"]
    assert "the worker on part-00001.parquet died (exit code -9); retrying that part alone" in caplog.text
    assert not (tmp_path / "two" / "_work" / "augment" / two.key).exists()


def test_chrf_band_rejects_garbage_and_copies(tmp_path):
    rows = make_docs(30, seed=4)
    train = [r for r in rows if split_of(r["doc_id"], SPLIT) == "train"]
    mislabeled = dict(
        train[1], doc_id=train_id("mislabeled"), lang="es", text=EN[0] + " " + EN[1]
    )  # English text labelled Spanish
    unchanged = dict(train[2], doc_id=train_id("unchanged"), lang="en", text=NAMES_ONLY)
    rows += [mislabeled, unchanged]
    store = Store(tmp_path)
    cfg = AugmentConfig(fraction=1.0)  # default band 50..90
    m = augment.run(store, cfg, publish(store, rows), SPLIT)

    kept = [r for r in read_table(m).to_pylist() if r["augmented_from"]]
    dropped = read_table(m, "dropped").to_pylist()
    reasons = {r["augmented_from"]: r["dropped_reason"] for r in dropped}
    assert (
        reasons[mislabeled["doc_id"]] == "roundtrip_chrf_low" and reasons[unchanged["doc_id"]] == "roundtrip_chrf_high"
    )
    assert all(cfg.chrf_min <= r["chrf"] <= cfg.chrf_max for r in kept)
    for r in dropped:
        assert (r["chrf"] < cfg.chrf_min) == (r["dropped_reason"] == "roundtrip_chrf_low")
        assert (r["chrf"] > cfg.chrf_max) == (r["dropped_reason"] == "roundtrip_chrf_high")
    stats = m.counters["augment"]
    assert stats["rejected"] == {reason: sum(v == reason for v in reasons.values()) for reason in set(reasons.values())}
    assert stats["candidates"] == stats["accepted"] + len(dropped) and stats["accepted"] == len(kept) > 0
    assert m.counters["dropped"] == {} and m.counters["docs_out"] == len(rows) + len(kept)


def test_rerun_is_a_cache_hit_and_config_changes_the_key(tmp_path):
    store = Store(tmp_path)
    docs = publish(store, make_docs(20, seed=5))
    cfg = AugmentConfig(fraction=0.5, **WIDE)
    first = augment.run(store, cfg, docs, SPLIT)
    again = augment.run(store, cfg, docs, SPLIT)
    assert (again.key, again.created_at) == (first.key, first.created_at)
    off = AugmentConfig(enabled=False)  # no translation needed to see keys change
    keys = {
        augment.run(store, off, docs, SPLIT).key,
        augment.run(store, off.model_copy(update={"seed": 1}), docs, SPLIT).key,
        augment.run(store, off, docs, SplitConfig(val_fraction=0.5)).key,
        first.key,
    }
    assert len(keys) == 4


def test_disabled_passes_documents_through_without_a_backend(tmp_path, monkeypatch):
    rows = make_docs(12, seed=6)
    store = Store(tmp_path)
    docs = publish(store, rows)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for cfg in (AugmentConfig(enabled=False), AugmentConfig(fraction=0.0)):
        m = augment.run(store, cfg, docs, SPLIT)
        assert read_table(m).to_pylist() == [{**r, "augmented_from": None, "chrf": None} for r in rows]
        assert m.counters["docs_in"] == m.counters["docs_out"] == len(rows) and m.counters["augment"]["candidates"] == 0


def test_missing_apertium_is_a_stage_error_with_install_hint(tmp_path, monkeypatch):
    store = Store(tmp_path)
    docs = publish(store, make_docs(6))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(StageError, match="apt-get install apertium apertium-eng-spa") as err:
        augment.run(store, AugmentConfig(), docs, SPLIT)
    assert err.value.stage == "augment" and "apertium" in err.value.reason


def test_bad_inputs_and_configs(tmp_path):
    store = Store(tmp_path)
    no_lang = publish(store, [{k: v for k, v in r.items() if k != "lang"} for r in make_docs(6)], "no-lang")
    with pytest.raises(StageError, match=r"lack column\(s\) \[.lang.\]"):
        augment.run(store, AugmentConfig(), no_lang, SPLIT)
    with pytest.raises(StageError, match="no fr-en direction"):
        augment.run(store, AugmentConfig(pivots={"fr": "en"}), publish(store, make_docs(6)), SPLIT)
    for bad in (
        dict(chrf_min=80, chrf_max=60),
        dict(pivots={"en": "en"}),
        dict(marian_models={"english": "/x"}),
        dict(fraction=1.5),
        dict(unknown=1),
    ):
        with pytest.raises(ValidationError):
            AugmentConfig(**bad)


def test_text_prefix_cuts_at_a_paragraph():
    text = "First paragraph here.\n\nSecond paragraph, a bit longer.\n\nThird."
    assert text_prefix(text, 1000) == text
    assert text_prefix(text, 40) == "First paragraph here."
    assert text_prefix("One sentence. Two sentences here", 20) == "One sentence."
    assert text_prefix("word " * 10, 12) == "word word"
