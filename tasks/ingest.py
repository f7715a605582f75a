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
- Local inputs (``files``, ``warc``) are fingerprinted by name, size and mtime
  (:func:`cache_fingerprint`), so changed files give a new key. A crawl's key is its
  config alone: set ``snapshot`` (e.g. the date) to fetch the web again.
- WARC reading uses fastwarc. A record that fails its block digest or cannot be parsed
  is dropped as ``malformed_record`` and reading resumes at the next record boundary
  (the next ``WARC/1.`` line, or the next gzip member), so one bad record does not
  cost the rest of the file. A missing or unreadable file fails the stage, naming it.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import mmap
import os
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType, has_block_digest
from pydantic import Field, model_validator

from storage.artifact import Manifest, PartBuffer, Store
from storage.documents import Funnel, make_doc_id
from tasks.common import StageConfig, StageError, begin, code_version, stage_logger, stage_task
from tasks.crawl import HTML_TYPES, CrawlConfig, Crawler, Drop, Page

STAGE = "ingest"
CODE_VERSION = code_version(__name__, "tasks.crawl")
WARC_NAME = "crawl-00000.warc.gz"
PART_ROWS = 20_000
PART_BYTES = 128 << 20
log = stage_logger(STAGE)

RAW_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string()),
    pa.field("url", pa.string()),
    pa.field("source", pa.string()),
    pa.field("fetched_at", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("content_type", pa.string()),
    pa.field("charset", pa.string()),
    pa.field("body", pa.binary()),
])
DROPPED_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string()),
    pa.field("url", pa.string()),
    pa.field("source", pa.string()),
    pa.field("fetched_at", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("dropped_reason", pa.string()),
    pa.field("detail", pa.string()),
])


class WarcConfig(StageConfig):
    """Local WARC or WET files to read."""

    paths: list[str] = Field(..., min_length=1, description="WARC/WET files or glob patterns (gzip, zstd, lz4 or plain).")
    verify_digests: bool = Field(True, description="Drop records whose WARC-Block-Digest does not match their bytes.")


class FilesConfig(StageConfig):
    """A local folder of pages."""

    root: str = Field(..., min_length=1, description="Folder searched recursively; each file's URL is its file:// URI.")
    extensions: list[str] = Field([".html", ".htm", ".txt"], min_length=1, description="File name endings read (case-insensitive); .txt is text/plain, the rest text/html.")


class IngestConfig(StageConfig):
    """Where the raw pages come from: set ``kind`` and the matching section."""

    kind: Literal["crawl", "warc", "files"] = Field("crawl", description="Source of pages: a live crawl, local WARC/WET files, or a folder.")
    crawl: CrawlConfig = Field(default_factory=CrawlConfig, description="Crawl settings (kind crawl).")
    warc: WarcConfig | None = Field(None, description="WARC input (kind warc).")
    files: FilesConfig | None = Field(None, description="Folder input (kind files).")
    snapshot: str = Field("", description="Label of this ingest (e.g. a date): a new label fetches again instead of reusing the cached crawl.")

    @model_validator(mode="after")
    def _section_for_kind(self) -> "IngestConfig":
        if getattr(self, self.kind) is None:
            raise ValueError(f"kind is {self.kind!r} but the {self.kind!r} section is missing")
        return self


# --- local inputs ----------------------------------------------------------------------------

def warc_paths(cfg: WarcConfig) -> list[Path]:
    """The files named by ``cfg.paths``, globs expanded, in a stable order."""
    out: list[Path] = []
    for pattern in cfg.paths:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise StageError(STAGE, pattern, "no file matches this pattern", "check warc.paths")
            out += [Path(m) for m in matches]
        elif not Path(pattern).is_file():
            raise StageError(STAGE, pattern, "WARC file not found", "check warc.paths")
        else:
            out.append(Path(pattern))
    return list(dict.fromkeys(p.resolve() for p in out))


def files_under(cfg: FilesConfig) -> list[Path]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise StageError(STAGE, str(root), "folder not found", "check files.root")
    endings = tuple(e.lower() for e in cfg.extensions)
    return sorted(p.resolve() for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(endings))


def cache_fingerprint(cfg: IngestConfig, **_: object) -> str:
    """Names, sizes and mtimes of the local input files ('' for a crawl)."""
    try:
        paths = warc_paths(cfg.warc) if cfg.kind == "warc" else files_under(cfg.files) if cfg.kind == "files" else []
    except StageError as e:
        return f"unresolved: {e}"
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest() if paths else ""


def _iso(ts: float | _dt.datetime) -> str:
    when = ts if isinstance(ts, _dt.datetime) else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")


def read_files(paths: list[Path]) -> Iterator[Page | Drop]:
    for p in paths:
        try:
            body = p.read_bytes()
        except OSError as e:
            yield Drop(p.as_uri(), "unreadable_file", str(e))
            continue
        ctype = "text/plain" if p.suffix.lower() == ".txt" else "text/html"
        yield Page(p.as_uri(), _iso(p.stat().st_mtime), None, ctype, None, body)


def _records(path: Path, verify: bool) -> Iterator[tuple[WarcRecord, bytes] | Drop]:
    """Response and conversion records of one file with their payloads read (HTTP headers
    parsed); an unreadable stretch becomes one drop."""
    types = WarcRecordType.response | WarcRecordType.conversion
    try:
        f = open(path, "rb")
    except OSError as e:
        raise StageError(STAGE, str(path), f"cannot open WARC file: {e}", "check the path and its permissions") from e
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            boundary = b"\x1f\x8b\x08" if data[:2] == b"\x1f\x8b" else b"WARC/1."
            start, suppress = 0, False
            while start >= 0:
                f.seek(start)
                last = start
                try:
                    for rec in ArchiveIterator(f, record_types=types, parse_http=False):
                        last = rec.stream_pos
                        uri = rec.headers.get("WARC-Target-URI") or f"{path.as_uri()}#offset={last}"
                        problem = None
                        if rec.headers.get("Content-Length") != str(rec.content_length):
                            problem = "truncated record (Content-Length missing or not met)"
                        elif verify and has_block_digest(rec) and not rec.verify_block_digest(consume=False):
                            problem = "WARC-Block-Digest does not match"
                        if problem:
                            suppress = True
                            yield Drop(uri, "malformed_record", f"{path.name} offset {last}: {problem}")
                            continue
                        if rec.record_type == WarcRecordType.response:
                            rec.parse_http()
                        payload = rec.reader.read()
                        suppress = False
                        yield rec, payload
                    return
                except OSError as e:
                    if not suppress:
                        yield Drop(f"{path.as_uri()}#offset={last}", "malformed_record", f"{path.name} after offset {last}: {e}")
                    suppress = True
                    start = data.find(boundary, last + 1)


def read_warcs(paths: list[Path], verify: bool) -> Iterator[Page | Drop]:
    seen: set[str] = set()
    for path in paths:
        log.info("reading %s", path)
        for item in _records(path, verify):
            if isinstance(item, Drop):
                yield item
                continue
            rec, payload = item
            url = rec.headers.get("WARC-Target-URI") or ""
            fetched_at = _iso(rec.record_date)
            where = f"{path.name} offset {rec.stream_pos}"
            if not url:
                yield Drop(f"{path.as_uri()}#offset={rec.stream_pos}", "malformed_record", f"{where}: no WARC-Target-URI")
                continue
            if rec.record_type == WarcRecordType.conversion:
                page = Page(url, fetched_at, None, "text/plain", "utf-8", payload)
            else:
                status = rec.http_headers.status_code if rec.http_headers is not None else None
                if status is None:
                    yield Drop(url, "malformed_record", f"{where}: unparseable HTTP response header", fetched_at)
                    continue
                if not 200 <= status < 300:
                    yield Drop(url, f"http_{status}", f"{where}: HTTP {status}", fetched_at, status)
                    continue
                ctype = (rec.http_content_type or "").lower()
                if ctype not in HTML_TYPES:
                    yield Drop(url, "not_html", f"{where}: Content-Type {ctype or 'missing'}", fetched_at, status)
                    continue
                page = Page(url, fetched_at, status, ctype, (rec.http_charset or "").lower() or None, payload)
            if url in seen:
                yield Drop(url, "duplicate_url", f"{where}: URL already read", fetched_at, page.http_status)
                continue
            seen.add(url)
            yield page


# --- the stage -------------------------------------------------------------------------------

def run(store: Store, cfg: IngestConfig) -> Manifest:
    """Fetch or read raw pages into an artifact of undecoded bodies plus a dropped table."""
    b = begin(store, STAGE, CODE_VERSION, cfg, fingerprint=cache_fingerprint(cfg))
    if b.done:
        return b.done
    funnel = Funnel()
    with store.writer(STAGE, b.key, parents=b.parents, config=b.config, code_version=CODE_VERSION) as w:
        meta: dict = {"kind": cfg.kind}
        if cfg.kind == "crawl":
            crawler = Crawler(cfg.crawl)
            items, what = crawler.crawl(w.dir / WARC_NAME), f"crawl of {', '.join(cfg.crawl.seeds)}"
            meta["warc"] = WARC_NAME
        elif cfg.kind == "warc":
            paths = warc_paths(cfg.warc)
            items, what = read_warcs(paths, cfg.warc.verify_digests), f"{len(paths)} WARC file(s)"
            meta["files"] = len(paths)
        else:
            paths = files_under(cfg.files)
            items, what = read_files(paths), f"folder {cfg.files.root}"
            meta["files"] = len(paths)
        body_size = lambda row: len(row["body"])  # noqa: E731  (raw HTML bounds a part, not its row count)
        kept = PartBuffer(w, "part", RAW_SCHEMA, max_rows=PART_ROWS, max_bytes=PART_BYTES, size_of=body_size)
        dropped = PartBuffer(w, "dropped", DROPPED_SCHEMA, max_rows=PART_ROWS)
        body_bytes = 0
        for item in items:
            funnel.seen("")
            if isinstance(item, Drop):
                funnel.dropped(item.reason)
                dropped.add({"doc_id": make_doc_id(item.url), "url": item.url, "source": cfg.kind, "fetched_at": item.fetched_at,
                             "http_status": item.http_status, "dropped_reason": item.reason, "detail": item.detail})
            else:
                funnel.kept("")
                body_bytes += len(item.body)
                kept.add({"doc_id": make_doc_id(item.url), "url": item.url, "source": cfg.kind, "fetched_at": item.fetched_at,
                          "http_status": item.http_status, "content_type": item.content_type, "charset": item.charset, "body": item.body})
            if funnel.docs_in % 1000 == 0:
                log.info("%d pages attempted, %d kept", funnel.docs_in, funnel.docs_out)
        if funnel.docs_out == 0:
            reasons = ", ".join(f"{r}: {n}" for r, n in funnel.dropped_docs.most_common(5)) or "nothing found"
            raise StageError(STAGE, what, f"no page kept out of {funnel.docs_in} ({reasons})",
                             "check the seeds or paths, robots.txt and the network")
        kept.flush()
        dropped.flush()
        if cfg.kind == "crawl":
            meta.update(crawler.stats)
        meta["body_bytes"] = body_bytes
        w.counters.update(funnel.as_counters())
        w.meta.update(meta)
        log.info("ingest %s: %d kept, %d dropped %s", what, funnel.docs_out, funnel.docs_in - funnel.docs_out, dict(funnel.dropped_docs))
    return w.manifest


task = stage_task(run, name=STAGE, retries=2)
