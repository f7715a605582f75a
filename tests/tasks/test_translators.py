"""Translation backends: Apertium on real sentences, Marian with a tiny model built here."""

import io
import json
import random
import shutil

import pyarrow as pa
import pytest

from storage.artifact import Store, read_table
from storage.documents import SplitConfig, make_doc_id, split_of
from tasks import augment
from tasks.text.translators import ApertiumTranslator, MarianTranslator, TranslatorError
from tests.tasks.sentences import EN as ALL_EN

EN = ALL_EN[:6]
ES = [
    "La biblioteca antigua del centro abre a las nueve de la mañana todos los días.",
    "Los agricultores del valle cultivan manzanas, peras y ciruelas en pequeñas parcelas familiares.",
    "Ella escribió una carta larga a su hermano, que vive al otro lado del océano.",
    "El tren a la capital llegó tarde por la nieve que cubría las vías.",
]

needs_apertium = pytest.mark.skipif(
    shutil.which("apertium") is None, reason="Debian packages apertium + apertium-eng-spa not installed"
)


@needs_apertium
def test_apertium_round_trip_changes_text_and_keeps_count():
    t = ApertiumTranslator()
    assert {("en", "es"), ("es", "en")} <= t.pairs
    texts = EN + ["", "   "]
    spanish = t.translate(texts, "en", "es")
    back = t.translate(spanish, "es", "en")
    assert len(spanish) == len(back) == len(texts)
    assert spanish[-2:] == ["", ""] and back[-2:] == ["", ""]
    assert "biblioteca" in spanish[0] and "manzanas" in spanish[1]
    assert all(b and b != e for b, e in zip(back, EN))
    english = t.translate(ES, "es", "en")
    assert "library" in english[0] and all(english)


@needs_apertium
def test_apertium_batching_preserves_order_and_layout():
    # A number unique to each document must come back in its own slot, whatever the batching.
    texts = [f"Report {100 + i}: {EN[i % len(EN)]}\n\n{EN[(i + 1) % len(EN)]}" for i in range(4)]
    texts.append("A line with a separator §§§ inside and more text.")
    t = ApertiumTranslator()
    one_call = t.translate(texts, "en", "es")
    t.max_batch_chars = 1
    alone = t.translate(texts, "en", "es")
    t.max_batch_chars = 300
    few_calls = t.translate(texts, "en", "es")
    assert len(alone) == len(one_call) == len(few_calls) == len(texts)
    for batch in (alone, one_call, few_calls):
        for i in range(len(texts) - 1):
            assert f"{100 + i}" in batch[i] and batch[i].count("\n\n") == 1
        assert "línea" in batch[-1] and "§" in batch[-1]


@needs_apertium
def test_apertium_unknown_direction_names_it():
    with pytest.raises(TranslatorError, match="no en-xx direction"):
        ApertiumTranslator().translate(["Hello."], "en", "xx")


def test_apertium_missing_binary_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TranslatorError) as err:
        ApertiumTranslator()
    assert "apertium backend" in str(err.value)
    assert "apt-get install apertium apertium-eng-spa" in err.value.hint


# --- Marian -----------------------------------------------------------------------------


def build_tiny_marian(path, seed: int):
    """A randomly initialized MarianMT model (d_model 16, 1 layer) and its tokenizer, saved to path."""
    sentencepiece = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import torch

    torch.set_num_threads(1)
    rng = random.Random(seed)
    words = " ".join(EN + ES).replace(".", "").replace(",", "").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=spm,
        vocab_size=120,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=-1,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    path.mkdir(parents=True)
    (path / "source.spm").write_bytes(spm.getvalue())
    (path / "target.spm").write_bytes(spm.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm.getvalue())
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(path / "source.spm"), target_spm=str(path / "target.spm"), vocab=str(path / "vocab.json")
    )
    config = transformers.MarianConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        eos_token_id=0,
        decoder_start_token_id=vocab["<pad>"],
        forced_eos_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.MarianMTModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def marian_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    return {"en-es": str(build_tiny_marian(root / "en-es", 1)), "es-en": str(build_tiny_marian(root / "es-en", 2))}


def test_marian_translates_in_order_and_keeps_layout(marian_dirs):
    t = MarianTranslator(marian_dirs, batch_size=2, max_length=16)
    assert t.pairs == {("en", "es"), ("es", "en")}
    texts = [EN[0], EN[1] + " " + EN[2] + "\n\n" + EN[3], "", EN[0], "line one\nline two"]
    out = t.translate(texts, "en", "es")
    assert len(out) == len(texts)
    assert out[2] == "" and out[0] == out[3] and out[0]
    assert out[1].count("\n\n") == 1 and out[4].count("\n") == 1
    assert out[0] == t.translate([EN[0]], "en", "es")[0]
    assert t.translate(out, "es", "en")[0] != EN[0]


def test_marian_missing_model_dir_is_named(tmp_path):
    with pytest.raises(TranslatorError, match="no config.json") as err:
        MarianTranslator({"en-es": str(tmp_path / "opus-mt-en-es")})
    assert "opus-mt-en-es" in str(err.value)


def test_augment_stage_with_marian_backend(tmp_path, marian_dirs):
    rows = []
    for i in range(30):
        lang, bank = ("en", EN) if i % 2 else ("es", ES)
        text = " ".join(bank[(i + k) % len(bank)] for k in range(2))
        url = f"http://127.0.0.1/{lang}/{i}.html"
        rows.append(
            dict(
                doc_id=make_doc_id(url, text),
                url=url,
                source="test",
                fetched_at="2026-01-01T00:00:00Z",
                text=text,
                lang=lang,
            )
        )
    store = Store(tmp_path / "store")
    with store.writer("filter", "marian-input") as w:
        w.write_table(pa.Table.from_pylist(rows))
    split = SplitConfig(val_fraction=0.2)
    cfg = augment.AugmentConfig(
        backend="marian", marian_models=marian_dirs, marian_max_length=16, fraction=1.0, chrf_min=0.0, chrf_max=100.0
    )
    m = augment.run(store, cfg, w.manifest, split)
    train = [r for r in rows if split_of(r["doc_id"], split) == "train"]
    stats = m.counters["augment"]
    assert stats["candidates"] == stats["accepted"] == stats["eligible"] == len(train) > 0
    out = read_table(m).to_pylist()
    new = [r for r in out if r["augmented_from"]]
    assert {r["augmented_from"] for r in new} == {r["doc_id"] for r in train}
    assert {r["source"] for r in new} == {"backtranslation:marian:en-es-en", "backtranslation:marian:es-en-es"}
    assert all(0.0 <= r["chrf"] <= 100.0 for r in new)
    assert m.meta["backend"] == "marian" and m.meta["words_per_s"] > 0
