"""The engines the stages compose: crawler, WARC and folder readers, HTML extraction,
MinHash, quality rules, language ID, translators.

Each works on plain Python values (bytes, strings, lists of records) and imports neither
Prefect, torch nor the artifact store, so it can be imported, tested and reused on its
own. A stage (``tasks/<stage>.py``) feeds it the parts of an artifact and writes what it
returns. Each engine owns its settings class (a :class:`tasks.text.settings.Settings`).
"""
