"""Augment stage: paraphrases of training documents by back-translation (src -> pivot -> src).

Design decisions:

- Every input document passes through unchanged (``augmented_from`` and ``chrf`` null);
  accepted paraphrases are added as new documents. ``docs_in``/``docs_out`` describe that
  stream, so ``docs_out`` can exceed ``docs_in``. Candidate paraphrases have their own
  counters (``counters["augment"]``); rejected ones sit in ``dropped-*`` with their reason.
- Only **train-split** documents are augmented (``split_of`` with the shared
  :class:`SplitConfig`). A paraphrase inherits its source's split downstream (through
  ``augmented_from``), and a validation document's paraphrase in train would leak it.
- Which documents get a paraphrase is a hash of (seed, doc_id) below ``fraction``; with
  ``max_docs`` the lowest hashes win. The choice is deterministic and does not depend on
  the order or sharding of the input (a first pass reads only ids, languages and texts).
- Cost is bounded per document: only a prefix of at most ``max_chars``, cut at a
  paragraph (else line, sentence, word) boundary, is round-tripped, and the paraphrase
  is that prefix's back-translation.
- Quality gate: chrF (sacrebleu, character 6-grams) between the prefix and its back-
  translation must lie in [chrf_min, chrf_max]. Too high means the round trip changed
  next to nothing (a heading, names, numbers); too low means garbage, typically text in
  another language than its ``lang`` label. Defaults from Apertium en<->es round trips
  of 2,000-character prefixes of the Debian handbook: English pages scored 59-92
  (median 78, 5th-95th percentile 68-86); Spanish pages 33-93, where everything below
  ~45 was an untranslated English page inside the Spanish edition. So 50 and 90.
- A paraphrase keeps url, fetched_at and lang of its source and gets a new doc_id
  (``make_doc_id(url + "#bt-" + pivot, text)``) and source
  ``backtranslation:<backend>:<src>-<pivot>-<src>``. Columns that other stages measured
  on the original text (lang_score, quality signals, cluster ids) are null: they do not
  describe the paraphrase.
- The translation backend (installed Apertium data, Marian model files) lives outside
  the store: its fingerprint is the stage's declared external input (:func:`installed_translator`).
- Both passes map over the input's parts on every core, or on Ray (:mod:`tasks.parts`; the
  per-part work is :mod:`tasks.text.backtranslation`): output part ``part-N`` holds input
  part N's documents and then the paraphrases of its chosen ones, whatever the number of
  workers. ``words_per_s`` is per translating worker: words over the workers' summed seconds.
"""

from __future__ import annotations

import shutil
import statistics
from collections import Counter
from functools import partial

import pyarrow.parquet as pq

from storage.artifact import Manifest, Store
from storage.documents import Funnel, SplitConfig, batch_splits, make_doc_id
from tasks.parts.core import Execution, Part, add_part_files, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageError, no_progress, require_columns, stage_logger
from tasks.text import backtranslation
from tasks.text.backtranslation import AugmentConfig, chrf, make_translator, selection_rank, text_prefix
from tasks.text.translators import TranslatorError

__all__ = ["AugmentConfig", "chrf", "installed_translator", "run", "selection_rank", "task", "text_prefix"]

log = stage_logger("augment")


def installed_translator(cfg: AugmentConfig, **_: object) -> str:
    """The external input of augment: the identity of the installed translation models."""
    if not cfg.active:
        return "off"
    try:
        return make_translator(cfg).fingerprint()
    except TranslatorError:
        return f"{cfg.backend}:unavailable"


STAGE = Stage("augment", __name__, external=installed_translator)


def _choose(
    pm: PartMap, parts: list[Part], cfg: AugmentConfig, split: SplitConfig
) -> tuple[dict[int, list[str]], dict]:
    """First pass: each part's doc_ids to paraphrase (the ``max_docs`` lowest ranks of the
    artifact), and how many documents were eligible or held out."""
    splits_of = partial(batch_splits, split=split)
    ranks = pm.map("rank", backtranslation.rank_part, parts, cfg, splits_of, progress=lambda f: pm.progress(0.1 * f))
    lowest = sorted((rank, doc_id, i) for i, r in enumerate(ranks) for rank, doc_id in r["ranked"])[: cfg.max_docs]
    chosen: dict[int, list[str]] = {p.index: [] for p in parts}
    for _, doc_id, i in lowest:
        chosen[parts[i].index].append(doc_id)
    pool = {k: sum(r[k] for r in ranks) for k in ("eligible", "val_skipped")}
    return chosen, pool


def run(
    store: Store,
    cfg: AugmentConfig,
    docs: Manifest,
    split: SplitConfig,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Pass every document through and add accepted back-translations of chosen train documents.

    ``execution`` sets the number of workers; the artifact is the same whatever it says.
    """
    b = STAGE.begin(store, cfg, docs=docs, split=split)
    if b.done:
        return b.done
    require_columns(
        STAGE.name,
        docs,
        ["doc_id", "text", *(["lang"] if cfg.active else [])],
        absent=("augmented_from", "chrf"),
        upstream="the filter stage (language identification)",
        allow_empty=True,
    )
    parts = input_parts(docs)
    active = cfg.active and bool(parts)  # inactive: no backend, no first pass, every document passes through
    if active:
        try:
            make_translator(cfg)  # a missing backend or direction fails here, with its hint, before any part
        except TranslatorError as e:
            raise StageError(STAGE.name, f"backend {cfg.backend}", str(e), e.hint) from e
    schema = pq.read_schema(parts[0].path) if parts else None
    funnel, tally = Funnel(), {"candidates": 0, "accepted": 0, "rejected": Counter(), "words": 0, "seconds": 0.0}
    scores: list[float] = []
    work = store.work_dir(STAGE.name, b.key)
    with (
        PartMap(STAGE.name, work, execution=execution or Execution(), log=log, progress=progress, store=store) as pm,
        STAGE.writer(store, b) as w,
    ):
        chosen, pool = _choose(pm, parts, cfg, split) if active else ({}, {"eligible": 0, "val_skipped": 0})
        results = pm.map(
            "translate",
            backtranslation.augment_part,
            parts,
            cfg,
            schema,
            make_doc_id,
            part_args=lambda p: (chosen.get(p.index, []),),
            progress=lambda f: progress(0.1 + 0.9 * f),  # the first pass reads; this one translates
        )
        for result in results:
            funnel.absorb(result["funnel"])
            scores += result["scores"]
            for k in ("candidates", "accepted", "words", "seconds"):
                tally[k] += result[k]
            tally["rejected"].update(result["rejected"])
        outputs = pm.outputs("translate", parts)
        add_part_files(w, parts, outputs, {backtranslation.KEPT: "part", backtranslation.DROPPED: "dropped"})
        w.counters.update(funnel.as_counters())
        w.counters["augment"] = {
            **pool,
            "candidates": tally["candidates"],
            "accepted": tally["accepted"],
            "rejected": dict(sorted(tally["rejected"].items())),
            "words_translated": tally["words"],
        }
        seconds = tally["seconds"]
        w.meta.update(backend=cfg.backend if active else None, translate_seconds=round(seconds, 3))
        w.meta["words_per_s"] = round(tally["words"] / seconds, 1) if seconds > 0 else None
        w.meta["execution"] = {"parts": len(parts), **pm.describe()}
        if scores:
            s = sorted(scores)
            deciles = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9
            w.meta["chrf"] = {
                "min": s[0],
                "p10": deciles[0],
                "median": statistics.median(s),
                "p90": deciles[-1],
                "max": s[-1],
            }
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "augment: %d documents in, %d paraphrases accepted of %d candidates (%s words/s)",
        funnel.docs_in,
        tally["accepted"],
        tally["candidates"],
        w.meta["words_per_s"],
    )
    return w.manifest


task = stage_task(STAGE, run, progress="augment: parts done")
