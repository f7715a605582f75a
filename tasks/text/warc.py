"""Reading WARC and WET files (fastwarc) into pages, dropping what cannot be read.

Design decisions:
- Response records with a 2xx HTML payload become pages (HTTP status, Content-Type and
  charset from their HTTP headers); WET conversion records become text/plain pages.
  Anything else is a :class:`~tasks.text.pages.Drop` with its reason (``http_404``,
  ``not_html``, ``duplicate_url``...).
- A record that fails its block digest or cannot be parsed is dropped as
  ``malformed_record`` and reading resumes at the next record boundary (the next
  ``WARC/1.`` line, or the next gzip member), so one bad record does not cost the rest of
  the file. A missing or unreadable file is a :class:`~tasks.text.pages.SourceError`.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
from pathlib import Path
from typing import Iterator

from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType, has_block_digest
from pydantic import Field

from tasks.text.pages import HTML_TYPES, Drop, Page, SourceError, iso_time
from tasks.text.settings import Settings

log = logging.getLogger("lmforge.ingest")


class WarcConfig(Settings):
    """Local WARC or WET files to read."""

    paths: list[str] = Field(
        ...,
        min_length=1,
        description="WARC/WET files or glob patterns (gzip, zstd, lz4 or plain); s3://bucket/key globs read objects (credentials from the AWS_* environment).",
    )
    verify_digests: bool = Field(True, description="Drop records whose WARC-Block-Digest does not match their bytes.")
    max_bytes: int = Field(
        5_000_000, ge=1024, description="Largest record read; a larger one is dropped as too_large, unread."
    )


def warc_paths(patterns: list[str]) -> list[Path]:
    """The local files named by ``patterns`` (``WarcConfig.paths``), globs expanded, in a stable order."""
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise SourceError(pattern, "no file matches this pattern", "check warc.paths")
            out += [Path(m) for m in matches]
        elif not Path(pattern).is_file():
            raise SourceError(pattern, "WARC file not found", "check warc.paths")
        else:
            out.append(Path(pattern))
    return list(dict.fromkeys(p.resolve() for p in out))


class _Resync(Exception):
    """A record's header cannot be trusted: go on at the next record boundary after it."""


def _records(path: Path, verify: bool, max_bytes: int) -> Iterator[tuple[WarcRecord, bytes] | Drop]:
    """Response and conversion records of one file with their payloads read (HTTP headers
    parsed); an unreadable stretch becomes one drop.

    A record's declared length is checked before anything of it is read: over
    ``max_bytes`` it is dropped unread (``too_large``); past the end of an uncompressed
    file it is a lie, dropped as ``malformed_record``, and reading resumes at the next
    ``WARC/1.`` line instead of skipping the rest of the file.
    """
    types = WarcRecordType.response | WarcRecordType.conversion
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SourceError(str(path), f"cannot open WARC file: {e}", "check the path and its permissions") from e
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            gzipped = data[:2] == b"\x1f\x8b"
            boundary = b"\x1f\x8b\x08" if gzipped else b"WARC/1."
            start, suppress = 0, False
            while start >= 0:
                f.seek(start)
                last = start
                try:
                    for rec in ArchiveIterator(f, record_types=types, parse_http=False):
                        last = rec.stream_pos
                        uri = rec.headers.get("WARC-Target-URI") or f"{path.as_uri()}#offset={last}"
                        if not gzipped and rec.stream_pos + rec.content_length > len(data):
                            yield Drop(
                                uri,
                                "malformed_record",
                                f"{path.name} offset {last}: declared length "
                                f"{rec.content_length} runs past the end of the file",
                            )
                            raise _Resync()
                        if rec.content_length > max_bytes:
                            yield Drop(
                                uri,
                                "too_large",
                                f"{path.name} offset {last}: {rec.content_length} bytes > max_bytes={max_bytes}",
                            )
                            continue
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
                except _Resync:
                    suppress = False
                    start = data.find(boundary, last + 1)
                except OSError as e:
                    if not suppress:
                        yield Drop(
                            f"{path.as_uri()}#offset={last}",
                            "malformed_record",
                            f"{path.name} after offset {last}: {e}",
                        )
                    suppress = True
                    start = data.find(boundary, last + 1)


def read_warc(path: Path, verify: bool, max_bytes: int = 5_000_000) -> Iterator[Page | Drop]:
    """The pages of one WARC/WET file in order; a URL read before in the same file is a Drop
    (across files, ingest's grouping decides: :mod:`tasks.text.ingest_parts`)."""
    seen: set[str] = set()
    log.info("reading %s", path)
    for item in _records(path, verify, max_bytes):
        if isinstance(item, Drop):
            yield item
            continue
        rec, payload = item
        url = rec.headers.get("WARC-Target-URI") or ""
        fetched_at = iso_time(rec.record_date)
        where = f"{path.name} offset {rec.stream_pos}"
        if not url:
            yield Drop(f"{path.as_uri()}#offset={rec.stream_pos}", "malformed_record", f"{where}: no WARC-Target-URI")
            continue
        if rec.record_type == WarcRecordType.conversion:
            page = Page(url, fetched_at, None, "text/plain", "utf-8", payload, where)
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
            charset = (rec.http_charset or "").lower() or None
            page = Page(url, fetched_at, status, ctype, charset, payload, where)
        if url in seen:
            yield Drop(url, "duplicate_url", f"{where}: URL already read", fetched_at, page.http_status)
            continue
        seen.add(url)
        yield page
