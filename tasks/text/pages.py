"""What a source of pages yields: a :class:`Page`, a :class:`Drop` with its reason, or an
:class:`Unchanged` page of an incremental refresh. The crawler, the WARC reader and the
folder reader all speak these, so the ingest stage stores them one way."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

HTML_TYPES = ("text/html", "application/xhtml+xml")


class SourceError(ValueError):
    """A whole input cannot be read (a missing file, a pattern matching nothing).

    Not a record-level problem: those are :class:`Drop`. ``input`` names the file or
    pattern, ``hint`` what to do.
    """

    def __init__(self, input: str, reason: str, hint: str | None = None):
        super().__init__(f"{input}: {reason}")
        self.input, self.reason, self.hint = input, reason, hint

    def __reduce__(self):  # raised in a worker process, re-raised in the parent: pickled with its fields
        return SourceError, (self.input, self.reason, self.hint)


@dataclass
class Page:
    """A document the source yields: what the ingest artifact stores per row."""

    url: str
    fetched_at: str
    http_status: int | None
    content_type: str
    charset: str | None
    body: bytes
    where: str = ""  # where in its source it was read (a WARC file and offset), for messages


@dataclass
class Drop:
    """A URL or record given up, with a snake_case reason and a human detail."""

    url: str
    reason: str
    detail: str
    fetched_at: str = ""
    http_status: int | None = None


@dataclass(frozen=True)
class Validator:
    """What a crawl knew of one URL, for the next crawl's conditional request."""

    url: str
    etag: str | None
    last_modified: str | None
    sha256: str
    links: tuple[str, ...] = ()


@dataclass
class Unchanged:
    """A known URL whose page did not change since the crawl that made ``validator``."""

    url: str
    reason: str  # not_modified (HTTP 304) or unchanged (200, same bytes)
    detail: str
    fetched_at: str
    http_status: int
    validator: Validator


def iso_time(ts: float | _dt.datetime) -> str:
    """A POSIX time or a datetime as ISO 8601 UTC, to the second."""
    when = ts if isinstance(ts, _dt.datetime) else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")


def page_row(page: Page, doc_id: str, source: str) -> dict:
    """A kept page as a row of an ingest artifact's ``part-*`` (its undecoded body included)."""
    return {
        "doc_id": doc_id,
        "url": page.url,
        "source": source,
        "fetched_at": page.fetched_at,
        "http_status": page.http_status,
        "content_type": page.content_type,
        "charset": page.charset,
        "body": page.body,
    }


def drop_row(drop: Drop | Unchanged, doc_id: str, source: str) -> dict:
    """A page given up, or unchanged, as a row of an ingest artifact's ``dropped-*``."""
    return {
        "doc_id": doc_id,
        "url": drop.url,
        "source": source,
        "fetched_at": drop.fetched_at,
        "http_status": drop.http_status,
        "dropped_reason": drop.reason,
        "detail": drop.detail,
    }
