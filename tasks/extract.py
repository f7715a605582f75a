"""extract: the main-content text of each raw page.

Design decisions:

- The work is :mod:`tasks.text.html`'s (decoding, resiliparse's main-content extraction);
  the stage maps over the ingest artifact's parts on every core or a Ray cluster
  (:mod:`tasks.parts`), each part in a worker process that enforces the per-page time
  limit (:mod:`tasks.text.extract_parts`). Output files are numbered in input order, so
  the artifact is the same whatever the number of workers.
- doc_id stays the one ingest gave (a hash of the URL); the body and HTTP columns go.
  Funnel words are counted on the extracted text, dropped documents included.
"""

from __future__ import annotations

import shutil

import pyarrow as pa

from storage.artifact import Manifest, Store
from storage.documents import BASE_FIELDS, BASE_SCHEMA, Funnel
from tasks.parts.core import Execution, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageError, no_progress, stage_logger
from tasks.text.extract_parts import extract_part
from tasks.text.html import ExtractConfig

STAGE = Stage("extract", __name__)
ATTEMPTS = (
    10  # deaths of one part's worker before the stage fails: a page past its time limit costs one, a crashing page two
)
DROPPED_SCHEMA = pa.schema([*BASE_FIELDS, pa.field("dropped_reason", pa.string()), pa.field("detail", pa.string())])
log = stage_logger(STAGE.name)


def run(
    store: Store,
    cfg: ExtractConfig,
    raw: Manifest,
    allow_empty: bool = False,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Decode and extract the text of every page of an ingest artifact.

    Keeping no text is an error unless ``allow_empty``: an incremental refresh whose only
    changed pages are too short (an index page that gained a link) has nothing new, and
    publishes an artifact without documents for the flow to see that. ``execution`` sets
    the workers; the artifact is the same whatever it says.
    """
    b = STAGE.begin(store, cfg, raw=raw, allow_empty=allow_empty)
    if b.done:
        return b.done
    funnel = Funnel()
    parts = input_parts(raw)
    work = store.work_dir(STAGE.name, b.key)
    with (
        PartMap(
            STAGE.name,
            work,
            execution=execution or Execution(),
            log=log,
            progress=progress,
            attempts=ATTEMPTS,
            store=store,
        ) as pm,
        STAGE.writer(store, b) as w,
    ):
        results = pm.map("text", extract_part, parts, cfg, BASE_SCHEMA, DROPPED_SCHEMA, isolate=True)
        for result in results:
            funnel.absorb(result["funnel"])
        if funnel.docs_out == 0 and not allow_empty:
            reasons = ", ".join(f"{r}: {n}" for r, n in funnel.dropped_docs.most_common(5)) or "no input pages"
            raise StageError(
                STAGE.name,
                raw.ref,
                f"no text kept out of {funnel.docs_in} pages ({reasons})",
                "check the ingest artifact's content types, or lower min_chars / raise timeout_seconds",
            )
        outputs = pm.outputs("text", parts)
        for prefix in ("part", "dropped"):
            numbered = [
                d / f"{prefix}-{n:05d}.parquet"
                for d, r in zip(outputs, results)
                for n in range(len(r["files"][prefix]))
            ]
            rows = [c for r in results for c in r["files"][prefix]]
            for n, (src, count) in enumerate(zip(numbered, rows)):
                w.add_file(src, f"{prefix}-{n:05d}.parquet", count)
        w.counters.update(funnel.as_counters())
        w.meta["execution"] = {"parts": len(parts), **pm.describe()}
        w.meta["dropped_unread"] = sum(r["unread"] for r in results)
    shutil.rmtree(work, ignore_errors=True)
    log.info("extract: %d pages in, %d kept", funnel.docs_in, funnel.docs_out)
    return w.manifest


task = stage_task(STAGE, run, progress="extract: parts done")
