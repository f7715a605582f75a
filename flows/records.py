"""What a flow keeps of each stage it ran: state, cache hit, time, counts, artifact.

Flows submit every stage through :func:`run_stage`, which waits for the result and
records whether Prefect served it from cache. The records become ``summary.json``,
the funnel table and the Prefect table artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.artifact import ArtifactError, Manifest
from tasks.cache_records import check_ref, ensure_records_block


@dataclass
class StageRecord:
    """One stage of one run, as the summary and the funnel show it."""

    stage: str
    status: str
    cached: bool
    seconds: float
    artifact: str
    docs_in: int | None = None
    docs_out: int | None = None
    words_in: int | None = None
    words_out: int | None = None
    dropped: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_from(stage: str, manifest: Manifest, state_name: str, seconds: float) -> StageRecord:
    c = dict(manifest.counters)
    return StageRecord(
        stage=stage,
        status=state_name,
        cached=state_name == "Cached",
        seconds=round(seconds, 3),
        artifact=manifest.ref,
        docs_in=c.pop("docs_in", None),
        docs_out=c.pop("docs_out", None),
        words_in=c.pop("words_in", None),
        words_out=c.pop("words_out", None),
        dropped=c.pop("dropped", {}),
        counters=c,
        meta=manifest.meta,
    )


def run_stage(records: dict[str, StageRecord], stage: str, task, **kwargs) -> Manifest | None:
    """Submit a stage task, wait for it, record its state; failures propagate to the flow.

    The task returns a reference to its artifact (:mod:`tasks.cache_records`); the manifest
    is loaded from the store. A cache hit counts only while its artifact is in the store
    and verifies: Prefect's record says the artifact was published, not that it still is.
    Otherwise the stage runs again (``refresh_cache``), rebuilding it, and the log says why.

    A stage may publish nothing (an incremental ingest that found no new page) and
    return None: its record then says so (no artifact, no documents out).
    """
    store = kwargs["store"]
    t0 = time.perf_counter()
    ensure_records_block()
    future = task.submit(**kwargs)
    ref = check_ref(future.result())
    problem = _cached_problem(store, ref) if future.state.name == "Cached" else None
    if problem:
        logging.getLogger(f"lmforge.{stage}").warning(
            "%s: cached result unusable (%s); running the stage again", stage, problem
        )
        future = task.with_options(refresh_cache=True).submit(**kwargs)
        ref = check_ref(future.result())
    manifest = None if ref is None else store.load(ref["stage"], ref["key"])
    if ref is not None and manifest is None:
        raise ArtifactError(f"{stage}: the task reported {ref['stage']}/{ref['key']}, which is not in {store.root}")
    seconds = time.perf_counter() - t0
    if manifest is None:
        state = future.state.name
        records[stage] = StageRecord(
            stage, state, state == "Cached", round(seconds, 3), artifact="", docs_out=0, meta={"published": False}
        )
    else:
        records[stage] = record_from(stage, manifest, future.state.name, seconds)
    return manifest


def _cached_problem(store, ref: dict[str, str] | None) -> str | None:
    """Why a cached reference cannot be used (its artifact gone, damaged, or unreadable), or None."""
    if ref is None:
        return None
    try:
        manifest = store.load(ref["stage"], ref["key"])
    except (ArtifactError, ValueError, OSError) as e:  # a manifest that does not parse or names another key
        return str(e)
    if manifest is None:
        return f"artifact {ref['stage']}/{ref['key']} is not in the store {store.root}"
    return store.problem(manifest)
