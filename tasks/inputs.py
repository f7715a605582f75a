"""A stage's input files, on this machine or in a bucket: WARC paths and ``s3://`` globs.

Design decisions:
- ``warc.paths`` may mix local files and globs with ``s3://bucket/key`` globs (Common
  Crawl's layout: ``s3://commoncrawl/crawl-data/CC-MAIN-.../warc/*.warc.gz``). Each
  pattern resolves in the order given; a pattern that matches nothing is an error naming
  it, as for a local glob.
- An input's fingerprint (part of the ingest key) is its name, size and modification
  time, local or remote alike, so a changed object gives a new key without reading it.
- A remote file is downloaded just before it is read and removed just after
  (:func:`local_copies`): the WARC reader wants a local file (it maps it into memory),
  and a crawl of thousands of files never needs more than one of them on disk.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from storage.object_store import ObjectStoreError, RemoteFile, download, is_object_store, matching_objects
from tasks.text.pages import SourceError
from tasks.text.warc import warc_paths

log = logging.getLogger("lmforge.ingest")


@dataclass(frozen=True)
class InputFile:
    """One input: a local ``path``, or a ``remote`` object to fetch before reading."""

    name: str
    size: int
    mtime_ns: int
    path: Path | None = None
    remote: RemoteFile | None = None


def resolve_warcs(patterns: list[str]) -> list[InputFile]:
    """Every file ``patterns`` name, pattern by pattern; SourceError for one that names nothing."""
    out: dict[str, InputFile] = {}
    for pattern in patterns:
        if is_object_store(pattern):
            try:
                found = matching_objects(pattern)
            except (ValueError, ObjectStoreError) as e:
                raise SourceError(pattern, str(e), "check warc.paths and the AWS_* settings") from None
            if not found:
                raise SourceError(pattern, "no object matches this pattern", "check warc.paths")
            for f in found:
                out.setdefault(f.url, InputFile(f.url, f.size, f.mtime_ns, remote=f))
        else:
            for p in warc_paths([pattern]):
                st = p.stat()
                out.setdefault(str(p), InputFile(str(p), st.st_size, st.st_mtime_ns, path=p))
    return list(out.values())


def fingerprint(files: list[InputFile]) -> str:
    """A hash of the files' names, sizes and modification times ('' for none)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x00{f.size}\x00{f.mtime_ns}\n".encode())
    return h.hexdigest() if files else ""


def local_copies(files: list[InputFile], scratch: Path) -> Iterator[Path]:
    """Each file as a local path, in order: remote ones fetched into ``scratch`` one at a
    time and deleted once the consumer asks for the next one."""
    for i, f in enumerate(files):
        if f.path is not None:
            yield f.path
            continue
        dest = scratch / f"{i:05d}" / f.remote.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (%.1f MB)", f.name, f.size / 1e6)
        try:
            download(f.name, dest)
        except ObjectStoreError as e:
            raise SourceError(f.name, f"cannot download the WARC file: {e}", "check the AWS_* settings") from None
        try:
            yield dest
        finally:
            dest.unlink(missing_ok=True)
