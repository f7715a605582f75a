"""The evaluation report's markdown: a row per model and language, and the languages it could not measure."""

from tasks.evaluate import _markdown


def _metrics(**by_group):
    row = {"documents": 3, "tokens": 90, "loss": 2.0, "perplexity": 7.39, "bits_per_byte": 1.25}
    return {**row, "by_group": {g: row for g in by_group}}


def test_report_names_languages_without_validation_documents():
    report = {
        "documents": 3,
        "where_sql": None,
        "unigram_bits_per_byte": 2.5,
        "generations": [],
        "base": _metrics(en=1),
        "finetuned": _metrics(en=1),
        "languages_without_val": ["es", "fr"],
    }
    text = _markdown(report)
    assert "| finetuned | en | 3 | 90 | 2.0000 | 7.39 | 1.2500 |" in text
    assert "Not measured (train documents, none held out): es, fr." in text
    assert "Not measured" not in _markdown({**report, "languages_without_val": []})
    assert "Not measured" not in _markdown(
        {k: v for k, v in report.items() if k != "languages_without_val"}
    )  # a cached report
