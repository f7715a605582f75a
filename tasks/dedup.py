"""Dedup stage: drop exact duplicates, then MinHash near-duplicates, keeping one per cluster.

Design decisions:

- Exact duplicates are documents whose normalized text (:func:`tasks.text.minhash.normalize`:
  case, diacritics, digits, punctuation and whitespace folded) hashes the same
  (BLAKE2b-128). Only the first of each group within a part is signed (MinHash), and
  only the first of each group in the artifact reaches the candidate buckets.
- Near duplicates follow FineWeb/datatrove: word 5-gram shingles, 112 = 14 bands x 8
  rows, no verification by default (a pair sharing one band is a duplicate; the
  candidate probability is 56/77/92/99% at Jaccard 0.7/0.75/0.8/0.85). Set
  ``verify_threshold`` to union only candidate pairs whose exact shingle Jaccard
  reaches it (text-dedup's false-positive check); it costs a second read of the
  candidates' texts.
- The work is split as datatrove and NeMo Curator split it, over the input's parts
  (:mod:`tasks.parts`): a map signs each part on every core (content hashes, and band
  keys of each part's first copy of a text; :mod:`tasks.text.dedup_parts`), a global
  step groups them (:mod:`tasks.text.dedup_group`: exact twins and candidate buckets as
  maps over slices of the content hashes and of the bands, each task in a DuckDB of its
  own under its share of a memory ceiling that it respects by spilling; connected
  components of the candidate pairs only, on the driver), and a last map writes each
  part's kept and dropped documents. Memory does not grow with the corpus beyond the
  duplicates; a killed worker costs its part or slice, a killed run the unfinished ones.
- Band keys stay in the artifact as ``bands-<part>.parquet`` (doc_id, ord, band,
  band_hash as uint64) for every document signed, so that later runs can dedup new
  documents against this corpus (``meta["minhash"]`` records the parameters their keys
  must match).
- Clusters are connected components of the candidate pairs (a bucket's first
  document with each other one). The document kept is the **first in artifact order**
  (for a crawl: the page reached first, nearest the seeds), whatever the number of
  workers; its doc_id is the ``cluster_id`` of every member, kept or dropped, exact
  twins included. A singleton's cluster_id is its own doc_id.
- ``duplicate_of`` names what a dropped document duplicates: an exact duplicate's
  first twin, a near duplicate's kept document. Following it always ends at a kept doc
  (for the ``seen_*`` reasons below, one kept by an earlier run).
- Every document's content hash goes to ``hashes-*.parquet`` (doc_id, ord, hash: the
  16-byte BLAKE2b of its normalized text), beside its band keys, so that later runs
  can dedup against this corpus exactly as well as approximately.
- Incremental refresh: ``earlier`` lists the dedup artifacts of the dataset being
  extended (its lineage). A new document whose hash is in their ``hashes-*`` is
  ``seen_exact``; one that shares a band key with their ``bands-*`` is ``seen_near``
  (two DuckDB joins over the files, no index in memory); ``duplicate_of`` is the earlier
  document, its own doc_id first when it matches, so a changed page whose new text is
  close to its old version reads "seen_near, duplicate of itself" and the old version
  stays. Seen documents leave before clustering: they neither anchor a cluster of new
  documents nor are kept, and an exact twin of one inherits its reason. Band keys only
  compare under the same MinHash parameters (``meta["minhash"]``): an earlier artifact
  with others is an error, not a silent miss. A substantially changed page (same URL,
  hence same doc_id) passes, and the shards stage lets it replace its old version.
- Results, files and the artifact key do not depend on ``execution`` (workers, memory
  ceiling): a test checks that 1 and 2 workers publish the same digest.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import Field, model_validator

from storage.artifact import Manifest, Store
from storage.documents import Funnel
from tasks.parts.core import Execution, Part, add_part_files, input_parts
from tasks.parts.partmap import PartMap
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, no_progress, require_columns, stage_logger
from tasks.text import dedup_parts, minhash
from tasks.text.dedup_group import (
    BUCKETS,
    SEEN,
    SEEN_EXACT,
    TWINS,
    Grouping,
    band_slices,
    bucket_band,
    hash_slices,
    seen_band,
    twins_slice,
)
from tasks.text.dedup_parts import SignParams

STAGE = Stage("dedup", __name__)
DECISIONS = "decisions.parquet"
log = stage_logger(STAGE.name)


class DedupConfig(StageConfig):
    """Exact and MinHash near-duplicate removal (defaults: datatrove / FineWeb)."""

    exact: bool = Field(True, description="Drop documents whose normalized text equals an earlier document's.")
    near: bool = Field(
        True, description="Drop MinHash near-duplicates (documents sharing an LSH band with an earlier one)."
    )
    ngram: int = Field(5, ge=1, le=64, description="Word n-gram size of the MinHash shingles.")
    num_perm: int = Field(112, ge=2, le=1024, description="MinHash permutations; must equal bands x rows.")
    bands: int = Field(14, ge=1, le=1024, description="LSH bands: more bands catch lower similarities.")
    rows: int = Field(
        8, ge=1, le=64, description="Signature values per band: more rows make the cut-off steeper and higher."
    )
    seed: int = Field(
        1,
        ge=0,
        lt=2**32,
        description="Seed of the MinHash permutations; band keys of two runs only match with the same seed.",
    )
    verify_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="If set, a candidate pair is a duplicate only when its exact shingle Jaccard reaches this (e.g. 0.75); empty: any shared band counts, as in FineWeb.",
    )

    @model_validator(mode="after")
    def _bands_times_rows(self) -> "DedupConfig":
        if self.bands * self.rows != self.num_perm:
            raise ValueError(
                f"bands x rows must equal num_perm: {self.bands} x {self.rows} = {self.bands * self.rows} != {self.num_perm}"
            )
        return self


def minhash_params(cfg: DedupConfig) -> dict:
    """What band keys depend on: two artifacts' keys compare only when these are equal."""
    return {
        "scheme": minhash.SCHEME,
        "ngram": cfg.ngram,
        "num_perm": cfg.num_perm,
        "bands": cfg.bands,
        "rows": cfg.rows,
        "seed": cfg.seed,
    }


def _files(manifests: list[Manifest], prefix: str) -> list[str]:
    return [
        str(m.path(f.path)) for m in manifests for f in m.files_with_prefix(prefix + "-") if f.path.endswith(".parquet")
    ]


def _check_earlier(store: Store, cfg: DedupConfig, earlier: list[Manifest]) -> None:
    for m in earlier:
        if m.stage != STAGE.name or store.load(m.stage, m.key) is None:
            raise StageError(
                STAGE.name,
                m.ref,
                "an earlier dedup artifact is missing from the store",
                "run a full refresh (incremental off)",
            )
        theirs = m.meta.get("minhash")
        if cfg.near and m.files_with_prefix("bands-") and theirs != minhash_params(cfg):
            raise StageError(
                STAGE.name,
                m.ref,
                f"its band keys were made with MinHash {theirs}, not {minhash_params(cfg)}",
                "restore the dedup settings of the dataset being refreshed, or run a full refresh (incremental off)",
            )


def _group(
    pm: PartMap,
    cfg: DedupConfig,
    execution: Execution,
    parts: list[Part],
    signed: list[Path],
    earlier: list[Manifest],
    progress: Progress,
) -> tuple[dict, dict[str, int]]:
    """The global step (:mod:`tasks.text.dedup_group`): its maps over slices of the keys on
    ``pm``'s engine, then components and decisions on this machine, to ``decisions.parquet`` in
    ``pm``'s work folder. Returns the artifact's meta (the grouping's counts) and the tasks of
    each map (for ``meta.execution``)."""
    work = pm.work_dir
    hash_files = [str(d / dedup_parts.HASHES) for d in signed if (d / dedup_parts.HASHES).exists()]
    band_files = [str(d / dedup_parts.BANDS) for d in signed if (d / dedup_parts.BANDS).exists()]
    by = "hash" if cfg.exact else ("doc_id" if cfg.near else None)
    share = max(64, execution.memory_mb // pm.workers)  # the ceiling, split among the tasks running at once
    wanted = 2 * pm.workers  # tasks per map: enough to keep every worker busy
    tasks: dict[str, int] = {}

    def map_slices(name: str, fn, slices: list, args: tuple, files: list[str], progress=None) -> list[Path]:
        # A step's checkpoints hold for one cut (<name>-<tasks>); files: all the tasks read, for Ray nodes to fetch.
        tasks[name] = len(slices)
        pm.map(f"{name}-{len(slices)}", fn, slices, *args, *files, progress=progress)
        return pm.outputs(f"{name}-{len(slices)}", slices)

    with Grouping(work, memory_mb=execution.memory_mb, threads=execution.worker_count()) as g:
        old_hashes = _files(earlier, "hashes") if cfg.exact else []
        if hash_files and by is not None:
            g.excluded(work / "none.parquet")  # the exact step excludes nothing
            slices = hash_slices(str(work / "none.parquet"), wanted)
            done = map_slices("twins", twins_slice, slices, (share, by, len(hash_files)), hash_files + old_hashes)
            g.load_exact([str(d / TWINS) for d in done], [str(d / SEEN_EXACT) for d in done if old_hashes])
        old_bands = _files(earlier, "bands") if cfg.near and band_files else []
        if old_bands:
            g.excluded(work / "not-near.parquet")  # twins, and documents seen exactly
            slices = band_slices(str(work / "not-near.parquet"), cfg.bands, wanted)
            done = map_slices("seen", seen_band, slices, (share, len(band_files)), band_files + old_bands)
            g.load_seen_near([str(d / SEEN) for d in done])
        seen = g.seen_counts() | {"earlier": [m.ref for m in earlier]} if earlier else {}
        g.excluded(work / "excluded.parquet")  # twins, and documents seen before
        slices = band_slices(str(work / "excluded.parquet"), cfg.bands if band_files else 0, wanted)
        done = map_slices("buckets", bucket_band, slices, (share,), band_files, progress=progress)
        g.load_buckets([str(d / BUCKETS) for d in done])
        if cfg.verify_threshold is None:
            pairs = g.pairs()
        else:
            pairs = g.verified_pairs(parts, cfg.ngram, cfg.verify_threshold)
        g.decisions(*pairs, work / DECISIONS)
    return g.stats | seen, tasks


def run(
    store: Store,
    cfg: DedupConfig,
    docs: Manifest,
    earlier: list[Manifest] | None = None,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Drop exact and near duplicates of ``docs`` (and of ``earlier`` dedup artifacts' documents);
    every document gets a ``cluster_id``. ``execution`` sets the workers and the memory
    ceiling; the artifact is the same whatever it says."""
    b = STAGE.begin(store, cfg, docs=docs, earlier=earlier)  # as passed: Prefect's cache key sees the same value
    earlier = list(earlier or [])
    if b.done:
        return b.done
    require_columns(
        STAGE.name, docs, ["doc_id", "text"], absent=("cluster_id", "duplicate_of"), upstream="the extract stage"
    )
    _check_earlier(store, cfg, earlier)
    execution = execution or Execution()
    started = time.monotonic()
    parts = input_parts(docs)
    work = store.work_dir(STAGE.name, b.key)
    params = SignParams(cfg.exact, cfg.near, cfg.ngram, cfg.num_perm, cfg.bands, cfg.rows, cfg.seed)
    with (
        PartMap(STAGE.name, work, execution=execution, log=log, store=store) as pm,
        STAGE.writer(store, b, extra_parents=earlier) as w,
    ):
        pm.map("sign", dedup_parts.sign_part, parts, params, progress=lambda f: progress(0.75 * f))
        seconds = {"sign": time.monotonic() - started}
        signed = pm.outputs("sign", parts)
        grouped, group_tasks = _group(pm, cfg, execution, parts, signed, earlier, lambda f: progress(0.75 + 0.05 * f))
        seconds["group"] = time.monotonic() - started - seconds["sign"]
        progress(0.8)
        funnels = pm.map(
            "apply", dedup_parts.apply_part, parts, str(work / DECISIONS), progress=lambda f: progress(0.8 + 0.2 * f)
        )
        seconds["apply"] = time.monotonic() - started - seconds["sign"] - seconds["group"]
        funnel = Funnel()
        for f in funnels:
            funnel.absorb(f)
        add_part_files(w, parts, signed, {dedup_parts.HASHES: "hashes", dedup_parts.BANDS: "bands"})
        add_part_files(w, parts, pm.outputs("apply", parts), {dedup_parts.KEPT: "part", dedup_parts.DROPPED: "dropped"})
        w.counters.update(funnel.as_counters())
        w.meta.update(grouped)
        if funnel.docs_out:
            w.meta["largest_cluster"] = max(w.meta["largest_cluster"], 1)
        w.meta["minhash"] = minhash_params(cfg)
        w.meta["execution"] = {"parts": len(parts), "group_tasks": group_tasks, **pm.describe()}
        w.meta["execution"]["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    log.info(
        "dedup: %d docs in, %d kept, %d clusters of duplicates, %d candidate pairs (%.0f docs/s, %d parts on %d workers)",
        funnel.docs_in,
        funnel.docs_out,
        w.meta["clusters"],
        w.meta["candidate_pairs"],
        funnel.docs_in / max(elapsed, 1e-9),
        len(parts),
        pm.workers,
    )
    return w.manifest


task = stage_task(STAGE, run, progress="dedup: parts done")
