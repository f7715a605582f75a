"""extract: the main-content text of each raw page.

Design decisions:

- The work is :mod:`tasks.text.html`'s (decoding, resiliparse's main-content extraction,
  worker processes with a per-document time limit); this stage streams the ingest
  artifact's pages through it in batches and writes kept and dropped documents.
- doc_id stays the one ingest gave (a hash of the URL); the body and HTTP columns go.
  Funnel words are counted on the extracted text, dropped documents included.
"""

from __future__ import annotations

import pyarrow as pa

from storage.artifact import Manifest, PartBuffer, Store, iter_batches
from storage.documents import BASE_FIELDS, BASE_SCHEMA, Funnel
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageError, stage_logger
from tasks.text.html import ExtractConfig, ExtractorPool, longest_word

STAGE = Stage("extract", __name__)
BATCH_ROWS = 512
DROPPED_SCHEMA = pa.schema([*BASE_FIELDS, pa.field("dropped_reason", pa.string()), pa.field("detail", pa.string())])
log = stage_logger(STAGE.name)


def run(store: Store, cfg: ExtractConfig, raw: Manifest, allow_empty: bool = False) -> Manifest:
    """Decode and extract the text of every page of an ingest artifact.

    Keeping no text is an error unless ``allow_empty``: an incremental refresh whose only
    changed pages are too short (an index page that gained a link) has nothing new, and
    publishes an artifact without documents for the flow to see that.
    """
    b = STAGE.begin(store, cfg, raw=raw, allow_empty=allow_empty)
    if b.done:
        return b.done
    funnel = Funnel()
    columns = ["doc_id", "url", "source", "fetched_at", "content_type", "charset", "body"]
    with STAGE.writer(store, b) as w, ExtractorPool(cfg) as pool:
        rows, size, chars = cfg.part_size.rows, cfg.part_size.max_bytes, lambda row: len(row["text"])
        kept = PartBuffer(w, "part", BASE_SCHEMA, max_rows=rows, max_bytes=size, size_of=chars)
        # runaway texts are kept to read, and bound a part like kept ones do
        dropped = PartBuffer(w, "dropped", DROPPED_SCHEMA, max_rows=rows, max_bytes=size, size_of=chars)
        for batch in iter_batches(raw, batch_size=BATCH_ROWS, columns=columns):
            rows = batch.to_pylist()
            outcomes = pool.map([(r["body"], r["content_type"], r["charset"]) for r in rows])
            for r, (reason, text, detail) in zip(rows, outcomes):
                doc = {k: r[k] for k in ("doc_id", "url", "source", "fetched_at")} | {"text": text}
                if reason is None and not text:
                    reason, detail = "empty_text", "no text left after extraction"
                elif reason is None and len(text) < cfg.min_chars:
                    reason, detail = "too_short", f"{len(text)} characters < min_chars={cfg.min_chars}"
                elif reason is None and len(text) > cfg.max_chars:
                    reason, detail = "too_long", f"{len(text)} characters > max_chars={cfg.max_chars}"
                elif reason is None and (longest := longest_word(text)) > cfg.max_word_chars:
                    reason, detail = (
                        "word_too_long",
                        f"a word of {longest} characters > max_word_chars={cfg.max_word_chars}",
                    )
                funnel.seen(text)
                if reason is None:
                    funnel.kept(text)
                    kept.add(doc)
                else:
                    funnel.dropped(reason, text)
                    dropped.add(doc | {"dropped_reason": reason, "detail": detail})
            log.info("extract: %d pages done, %d kept", funnel.docs_in, funnel.docs_out)
        if funnel.docs_out == 0 and not allow_empty:
            reasons = ", ".join(f"{r}: {n}" for r, n in funnel.dropped_docs.most_common(5)) or "no input pages"
            raise StageError(
                STAGE.name,
                raw.ref,
                f"no text kept out of {funnel.docs_in} pages ({reasons})",
                "check the ingest artifact's content types, or lower min_chars / raise timeout_seconds",
            )
        kept.flush()
        dropped.flush()
        w.counters.update(funnel.as_counters())
        w.meta.update({"worker_restarts": pool.restarts})
    return w.manifest


task = stage_task(STAGE, run)
