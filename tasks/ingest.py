"""ingest: raw web pages into the pipeline, from a live crawl, WARC/WET files or a folder.

Design decisions:

- One artifact schema whatever the source: ``part-*.parquet`` rows are doc_id
  (``make_doc_id(url)``), url, source, fetched_at, http_status, content_type, charset
  and the undecoded ``body`` bytes. Decoding and text extraction belong to ``extract``,
  so a better extractor never needs a re-crawl. ``http_status`` is null where no HTTP
  exchange happened (files, WET conversion records).
- Every URL attempted ends in ``part-*`` or in ``dropped-*`` (url, dropped_reason,
  detail...): docs_in = kept + dropped. Words are 0 here; they are counted from
  ``extract`` on.
- A crawl also leaves ``crawl-00000.warc.gz`` (request/response pairs of the kept
  pages) in the artifact: a faithful archive that kind ``warc`` can re-ingest.
- Inputs (``files``, ``warc``, WARC objects in a bucket: :mod:`tasks.inputs`) are fingerprinted by name, size and mtime
  (:func:`local_inputs`, the stage's declared external input), so changed files give a new key;
  one run lists them once (:func:`input_files`; a Prefect task run: for its cache key and
  lock too), so its parts read the files its key names. A crawl's key is its config alone:
  set ``snapshot`` (e.g. the date) to fetch the web again.
- The sources are engines of :mod:`tasks.text`: the crawler (:mod:`tasks.text.crawl`),
  the WARC reader (:mod:`tasks.text.warc`: one bad record is dropped as
  ``malformed_record``, not the file) and the folder reader (:mod:`tasks.text.files`).
  A missing or unreadable input file fails the stage, naming it.
- A WARC or folder ingest maps over its input on every core or a Ray cluster
  (:mod:`tasks.parts`, ``execution``; :mod:`tasks.text.ingest_parts`): one WARC file per
  step, or a run of a folder's files as large as one part (:func:`tasks.inputs.folder_parts`);
  input part N's pages come before input part N+1's. What needs every input part is one
  grouping step in DuckDB (:mod:`tasks.text.ingest_group`): a URL already read in an
  earlier WARC file is dropped as ``duplicate_url``, an unchanged body as ``unchanged``,
  and the validators are written from it. A crawl is read page by page in this process:
  its frontier is one queue, and the network, not a core, is what it waits on.
- Incremental refresh: ``previous`` is an earlier ingest artifact of the same sources.
  Every artifact holds ``validators-*.parquet`` (url, etag, last_modified, sha256 of
  the body, links): one row per page this ingest fetched, read, or confirmed unchanged.
  Given ``previous``, a crawl sends conditional requests for the URLs it lists and walks
  the stored links of the ones that did not change (:mod:`tasks.text.crawl`); any kind drops
  a page whose body hashes as before. Those URLs land in ``dropped-*`` as
  ``not_modified`` (HTTP 304, no body transferred) or ``unchanged``, and their
  validators are carried forward, so the next refresh still knows them. ``previous``
  is a parent: the lineage of a dataset version reaches back through every crawl.
  Counters ``meta["new"]`` / ``meta["changed"]`` count pages absent from / different
  from ``previous``.
- When ``previous`` is given and no page is new or changed, the stage publishes
  nothing and returns None: an unchanged site makes no artifact, and the flow says so.
  With no previous, or when pages failed rather than being unchanged, keeping nothing
  is an error as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from storage.artifact import Manifest, PartBuffer, Store, read_table
from storage.documents import Funnel, make_doc_id
from tasks.inputs import (
    InputFile,
    file_parts,
    fingerprint,
    folder_parts,
    read_folder_part,
    read_warc_part,
    resolve_warcs,
)
from tasks.parts.core import Execution
from tasks.parts.partmap import PartMap, warm_up
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, inputs_scope, no_progress, read_once, stage_logger
from tasks.text.crawl import CrawlConfig, Crawler
from tasks.text.files import FilesConfig, files_under, folder_root
from tasks.text.ingest_group import PageGrouping, removal_folder
from tasks.text.ingest_parts import DROPPED, PAGES, part_name, settle_part
from tasks.text.pages import Drop, SourceError, Unchanged, Validator, drop_row, page_row
from tasks.text.settings import PartSize
from tasks.text.warc import WarcConfig

WARC_NAME = "crawl-00000.warc.gz"
PART_ROWS = 20_000  # dropped pages and validators: small rows, not mapped over
log = stage_logger("ingest")

RAW_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("fetched_at", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("content_type", pa.string()),
        pa.field("charset", pa.string()),
        pa.field("body", pa.binary()),
    ]
)
DROPPED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("fetched_at", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("dropped_reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

VALIDATORS_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string()),
        pa.field("etag", pa.string()),
        pa.field("last_modified", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("links", pa.list_(pa.string())),
    ]
)


class IngestConfig(StageConfig):
    """Where the raw pages come from: set ``kind`` and the matching section."""

    kind: Literal["crawl", "warc", "files"] = Field(
        "crawl", description="Source of pages: a live crawl, local WARC/WET files, or a folder."
    )
    crawl: CrawlConfig = Field(default_factory=CrawlConfig, description="Crawl settings (kind crawl).")
    warc: WarcConfig | None = Field(None, description="WARC input (kind warc).")
    files: FilesConfig | None = Field(None, description="Folder input (kind files).")
    part_size: PartSize = Field(
        default_factory=PartSize,
        description="Size of the parts of kept pages (by raw body bytes); a WARC ingest also starts a part at each file.",
    )
    snapshot: str = Field(
        "",
        description="Label of this ingest (e.g. a date): a new label fetches again instead of reusing the cached crawl.",
    )

    @model_validator(mode="after")
    def _section_for_kind(self) -> "IngestConfig":
        if getattr(self, self.kind) is None:
            raise ValueError(f"kind is {self.kind!r} but the {self.kind!r} section is missing")
        return self


def local_inputs(cfg: IngestConfig, **_: object) -> str:
    """The external inputs of a WARC or folder ingest: names, sizes and mtimes of its files
    (objects in a bucket too; '' for a crawl)."""
    if cfg.kind == "crawl":
        return ""
    try:
        return fingerprint(input_files(cfg))
    except SourceError as e:
        return f"unresolved: {e}"


def input_files(cfg: IngestConfig) -> list[InputFile]:
    """The WARC files (local or in a bucket) or the folder's files that ``cfg`` names, in order.

    Listed once per run (:func:`tasks.stage.read_once`): the parts read exactly the files
    that the key fingerprints, and a folder or a bucket prefix is not walked twice (46,573
    files: 0.35 to 0.55 s a listing).
    """
    if cfg.kind == "warc":
        return read_once(f"ingest warc {cfg.warc.paths}", lambda: resolve_warcs(cfg.warc.paths))
    return read_once(
        f"ingest files {cfg.files.model_dump_json()}",
        lambda: [InputFile(f.path, f.size, f.mtime_ns) for f in files_under(cfg.files)],
    )


STAGE = Stage("ingest", __name__, external=local_inputs)


class _NothingNew(Exception):
    """Raised inside the writer so that it publishes nothing (its temp dir is removed)."""


def read_validators(previous: Manifest | None) -> dict[str, Validator]:
    """What an earlier ingest knew of each page (empty for None or an artifact without them)."""
    if previous is None:
        return {}
    table = read_table(previous, "validators")
    if not table.num_rows:
        return {}
    return {
        r["url"]: Validator(r["url"], r["etag"], r["last_modified"], r["sha256"], tuple(r["links"] or ()))
        for r in table.to_pylist()
    }


def _check_previous(previous: Manifest | None) -> None:
    if previous is not None and previous.stage != STAGE.name:
        raise StageError(
            STAGE.name,
            previous.ref,
            "previous must be an ingest artifact",
            "pass the ingest ancestor of the dataset to refresh",
        )


def run(
    store: Store,
    cfg: IngestConfig,
    previous: Manifest | None = None,
    execution: Execution | None = None,
    progress: Progress = no_progress,
) -> Manifest | None:
    """Fetch or read raw pages into an artifact of undecoded bodies plus a dropped table.

    With ``previous`` (an earlier ingest), only new or changed pages are kept; None
    (nothing published) when there is none. ``execution`` sets the workers of a WARC
    or folder ingest; the artifact is the same whatever it says.
    """
    with inputs_scope():
        return _run(store, cfg, previous, execution, progress)


def _run(
    store: Store, cfg: IngestConfig, previous: Manifest | None, execution: Execution | None, progress: Progress
) -> Manifest | None:
    _check_previous(previous)
    if cfg.kind != "crawl":  # the first stage of a run: its workers' fork server starts while it plans
        warm_up(execution or Execution())
    b = STAGE.begin(store, cfg, previous=previous)
    if b.done:
        return b.done
    funnel = Funnel()
    work = store.work_dir(STAGE.name, b.key)
    try:
        with STAGE.writer(store, b) as w:
            if cfg.kind == "crawl":
                meta = _crawl(cfg, read_validators(previous), w, funnel, previous, progress)
            else:
                meta = _ingest_parts(cfg, w, funnel, previous, execution or Execution(), progress, store, work)
    except _NothingNew:
        shutil.rmtree(work, ignore_errors=True)
        log.info(
            "ingest: no new or changed page since %s (%s); nothing published", previous.ref, dict(funnel.dropped_docs)
        )
        return None
    except SourceError as e:
        raise StageError(STAGE.name, e.input, e.reason, e.hint) from e
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "ingest %s: %d kept, %d dropped %s",
        meta["what"],
        funnel.docs_out,
        funnel.docs_in - funnel.docs_out,
        dict(funnel.dropped_docs),
    )
    return w.manifest


def _crawl(
    cfg: IngestConfig,
    known: dict[str, Validator],
    w,
    funnel: Funnel,
    previous: Manifest | None,
    progress: Progress,
) -> dict:
    """A crawl into the writer ``w``, page by page; returns the meta it recorded (plus a
    description, ``what``)."""
    crawler = Crawler(cfg.crawl, known)
    what = f"crawl of {', '.join(cfg.crawl.seeds)}"
    body_size = lambda row: len(row["body"])  # noqa: E731  (raw HTML bounds a part, not its row count)
    size = cfg.part_size
    kept = PartBuffer(w, "part", RAW_SCHEMA, max_rows=size.rows, max_bytes=size.max_bytes, size_of=body_size)
    dropped = PartBuffer(w, "dropped", DROPPED_SCHEMA, max_rows=PART_ROWS)
    body_bytes = 0
    first_drop: Drop | None = None  # quoted when nothing is kept: the reason in words, not only a count
    for item in crawler.crawl(w.dir / WARC_NAME):
        funnel.seen("")
        if isinstance(item, (Drop, Unchanged)):
            funnel.dropped(item.reason)
            if first_drop is None and isinstance(item, Drop):
                first_drop = item
            dropped.add(drop_row(item, make_doc_id(item.url), cfg.kind))
        else:
            funnel.kept("")
            body_bytes += len(item.body)
            kept.add(page_row(item, make_doc_id(item.url), cfg.kind))
        if funnel.docs_in % 1000 == 0:
            log.info("%d pages attempted, %d kept", funnel.docs_in, funnel.docs_out)
        progress(funnel.docs_in / cfg.crawl.max_pages)
    progress(1.0)
    _check_kept(funnel, previous, what, first_drop and (first_drop.url, first_drop.detail))
    kept.flush()
    dropped.flush()
    rows = PartBuffer(w, "validators", VALIDATORS_SCHEMA, max_rows=PART_ROWS)
    for v in crawler.validators.values():
        rows.add(
            {"url": v.url, "etag": v.etag, "last_modified": v.last_modified, "sha256": v.sha256, "links": list(v.links)}
        )
    rows.flush()
    meta = {"kind": cfg.kind, "warc": WARC_NAME, **crawler.stats, "body_bytes": body_bytes}
    meta["previous"] = previous.ref if previous is not None else None
    w.counters.update(funnel.as_counters())
    w.meta.update(meta)
    return {**meta, "what": what}


def _check_kept(funnel: Funnel, previous: Manifest | None, what: str, first_drop: tuple[str, str] | None) -> None:
    """Raise when nothing was kept: _NothingNew for a refresh whose pages all were unchanged
    (nothing is published), else the stage's error, with the first page given up and why."""
    unchanged = funnel.dropped_docs["not_modified"] + funnel.dropped_docs["unchanged"]
    if funnel.docs_out == 0 and previous is not None and unchanged:
        raise _NothingNew()
    if funnel.docs_out == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in funnel.dropped_docs.most_common(5)) or "nothing found"
        example = f"; first: {first_drop[0]}: {first_drop[1][:300]}" if first_drop is not None else ""
        raise StageError(
            STAGE.name,
            what,
            f"no page kept out of {funnel.docs_in} ({reasons}){example}",
            "check the seeds or paths, robots.txt and the network",
        )


def _ingest_parts(
    cfg: IngestConfig,
    w,
    funnel: Funnel,
    previous: Manifest | None,
    execution: Execution,
    progress: Progress,
    store: Store,
    work: Path,
) -> dict:
    """WARC files or a folder's files into the writer ``w``, one input part per step on the
    engine ``execution`` names (:mod:`tasks.text.ingest_parts`), then the grouping over all of
    them (:mod:`tasks.text.ingest_group`); returns the meta it recorded (plus ``what``)."""
    files = input_files(cfg)
    if cfg.kind == "warc":
        what, parts = f"{len(files)} WARC file(s)", file_parts(files)
        read_part, read_args, files_of = read_warc_part, (cfg.warc,), None
    else:
        what, parts = f"folder {cfg.files.root}", folder_parts(files, folder_root(cfg.files), cfg.part_size)
        read_part, read_args = read_folder_part, (cfg.files.max_bytes,)
        files_of = lambda p: ([f.name for f in files[p.start : p.start + p.rows]],)  # noqa: E731
    if not parts:  # an empty folder: nothing to group
        _check_kept(funnel, previous, what, None)
    with PartMap(STAGE.name, work, execution=execution, log=log, progress=progress, store=store) as pm:
        read = pm.map(
            "read", read_part, parts, *read_args, cfg.part_size, RAW_SCHEMA, DROPPED_SCHEMA, part_args=files_of
        )
        for result in read:
            funnel.absorb(result["funnel"])
        previous_validators = (
            [str(previous.path(f.path)) for f in previous.files_with_prefix("validators-")] if previous else []
        )
        with PageGrouping(work / "group", memory_mb=execution.memory_mb, threads=pm.workers) as group:
            group.decide([str(d / PAGES) for d in pm.outputs("read", parts)], previous_validators)
            removed = group.removals(work / "removals")
            for reasons in removed.values():
                for reason, n in reasons.items():
                    funnel.unkeep(reason, n)
            first = next((r["first_drop"] for r in read if r["first_drop"]), None)
            _check_kept(funnel, previous, what, first)
            touched = [p for p in parts if p.index in removed]
            read_dirs = dict(zip((p.index for p in parts), pm.outputs("read", parts)))
            settled = pm.map(
                "settle",
                settle_part,
                touched,
                DROPPED_SCHEMA,
                make_doc_id,
                cfg.kind,
                progress=no_progress,
                part_args=lambda p: (str(read_dirs[p.index]), str(removal_folder(work / "removals", p.index))),
            )
            outputs = dict(zip((p.index for p in parts), zip(pm.outputs("read", parts), read)))
            outputs |= dict(zip((p.index for p in touched), zip(pm.outputs("settle", touched), settled)))
            _add_outputs(w, [outputs[p.index] for p in parts])
            rows = PartBuffer(w, "validators", VALIDATORS_SCHEMA, max_rows=PART_ROWS)
            for batch in group.validators(VALIDATORS_SCHEMA, PART_ROWS):
                rows.add_table(pa.Table.from_batches([batch]))
            rows.flush()
            new, body_bytes = group.kept_totals()
        meta = {
            "kind": cfg.kind,
            "files": len(files),
            "new": new,
            "changed": funnel.docs_out - new,
            "body_bytes": body_bytes,
            "previous": previous.ref if previous is not None else None,
            "execution": {"parts": len(parts), **pm.describe()},
        }
    w.counters.update(funnel.as_counters())
    w.meta.update(meta)
    return {**meta, "what": what}


def _add_outputs(w, outputs: list[tuple[Path, dict]]) -> None:
    """Every input part's parts and drops into the artifact, numbered across input parts in
    order, so the artifact does not depend on the number of workers."""
    n_part = n_dropped = 0
    for folder, result in outputs:
        for i, rows in enumerate(result["parts"]):
            w.add_file(folder / part_name(i), f"part-{n_part:05d}.parquet", rows)
            n_part += 1
        if result["dropped"]:
            w.add_file(folder / DROPPED, f"dropped-{n_dropped:05d}.parquet", result["dropped"])
            n_dropped += 1


task = stage_task(
    STAGE,
    run,
    retries=2,
    progress="ingest: pages attempted (crawl) or input parts read (WARC files, runs of a folder's files)",
)
