"""A stage's input files, on this machine or in a bucket: WARC paths and ``s3://`` globs, a folder's files.

Design decisions:
- ``warc.paths`` may mix local files and globs with ``s3://bucket/key`` globs (Common
  Crawl's layout: ``s3://commoncrawl/crawl-data/CC-MAIN-.../warc/*.warc.gz``). Each
  pattern resolves in the order given; a pattern that matches nothing is an error naming
  it, as for a local glob.
- An input's fingerprint (part of the ingest key) is its name, size and modification
  time, local or remote alike, so a changed object gives a new key without reading it.
- A WARC ingest maps over its input files, one part each (:func:`file_parts`,
  :func:`read_warc_part`). A remote file is downloaded by the worker that reads it, just
  before, and removed just after: the WARC reader wants a local file (it maps it into
  memory), and a crawl of thousands of files never needs more than one per worker on disk.
- A folder ingest maps over runs of the folder's files in path order (:func:`folder_parts`),
  each closing where a single reader's part would have: at ``part_size.rows`` files or once
  ``part_size.mb`` of file bytes is reached. The files of a run travel with its step as
  paths: a folder, like a local WARC file, must be at the same path on every Ray node.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from storage.documents import make_doc_id
from storage.object_store import ObjectStoreError, RemoteFile, download, is_object_store, matching_objects
from tasks.parts.core import Part
from tasks.text.files import read_files
from tasks.text.ingest_parts import read_file, write_pages
from tasks.text.pages import SourceError
from tasks.text.settings import PartSize
from tasks.text.warc import WarcConfig, warc_paths

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


def file_parts(files: list[InputFile]) -> list[Part]:
    """One part per input file, in order: what a WARC ingest maps over."""
    return [Part(i, Path(f.name).name, f.name, 0, 0, f.size) for i, f in enumerate(files)]


def read_warc_part(
    part: Part, out: Path, warc: WarcConfig, part_size: PartSize, raw_schema: pa.Schema, dropped_schema: pa.Schema
) -> dict:
    """ingest's per-file step: WARC file ``part`` into ``out`` (:func:`tasks.text.ingest_parts.read_file`).

    A file in a bucket is downloaded into ``out`` first, by the worker that reads it (on
    whichever machine: a Ray node needs no shared disk for its inputs), and removed once read.
    """
    if not is_object_store(part.path):
        return _read(Path(part.path), part, out, warc, part_size, raw_schema, dropped_schema)
    dest = out / "_download" / part.name
    dest.parent.mkdir()
    log.info("downloading %s", part.path)
    try:
        download(part.path, dest)
    except ObjectStoreError as e:
        raise SourceError(part.path, f"cannot download the WARC file: {e}", "check the AWS_* settings") from None
    try:
        return _read(dest, part, out, warc, part_size, raw_schema, dropped_schema)
    finally:
        shutil.rmtree(dest.parent, ignore_errors=True)


def _read(path: Path, part: Part, out: Path, warc: WarcConfig, size: PartSize, raw_schema, dropped_schema) -> dict:
    return read_file(
        path,
        part.index,
        out,
        verify=warc.verify_digests,
        max_record=warc.max_bytes,
        **_writing(size, raw_schema, dropped_schema),
    )


def _writing(size: PartSize, raw_schema: pa.Schema, dropped_schema: pa.Schema) -> dict:
    """How every input part of an ingest writes its pages (:func:`tasks.text.ingest_parts.write_pages`)."""
    return {
        "part_rows": size.rows,
        "part_bytes": size.max_bytes,
        "raw_schema": raw_schema,
        "dropped_schema": dropped_schema,
        "make_doc_id": make_doc_id,
    }


def folder_parts(files: list[InputFile], root: Path, size: PartSize) -> list[Part]:
    """Runs of ``files`` (a folder's, in path order) as parts: each closes at ``size.rows``
    files or once its files reach ``size.max_bytes``. A part's ``start`` and ``rows`` are its
    first file's position and its number of files."""
    parts: list[Part] = []
    start = total = 0
    for i, f in enumerate(files):
        total += f.size
        if i + 1 - start >= size.rows or total >= size.max_bytes or i + 1 == len(files):
            first = Path(files[start].name).relative_to(root)
            name = f"{first}" if i == start else f"{first} and {i - start} more"
            parts.append(Part(len(parts), name, str(root), start, i + 1 - start, total))
            start, total = i + 1, 0
    return parts


def read_folder_part(
    part: Part,
    out: Path,
    paths: list[str],
    max_bytes: int,
    part_size: PartSize,
    raw_schema: pa.Schema,
    dropped_schema: pa.Schema,
) -> dict:
    """ingest's per-part step of a folder: the files ``paths`` (part ``part``'s run) into ``out``
    (:func:`tasks.text.ingest_parts.write_pages`)."""
    return write_pages(
        read_files(paths, max_bytes),
        part.index,
        out,
        source="files",
        place=part.name,
        **_writing(part_size, raw_schema, dropped_schema),
    )
