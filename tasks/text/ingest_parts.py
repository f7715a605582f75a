"""ingest's per-part steps: one WARC file's pages, or one run of a folder's files, into Parquet parts, in that part's worker.

Design decisions:

- A WARC ingest maps over its input files (:mod:`tasks.parts`), one file per step, so
  reading, decompressing and checking digests use every core (one process read every file
  before: 16 MB/s of gzipped WARC on the build machine, ``bench/scale.py``). A folder
  ingest maps over runs of its files in path order, each run as large as one part
  (``part_size``: its files' count and bytes), so a folder makes the parts a single
  reader would have made. Input part N's pages come before input part N+1's in the
  artifact whatever the number of workers.
- :func:`write_pages` does what one input part decides alone: pages kept or dropped with
  their reason (:mod:`tasks.text.warc`, :mod:`tasks.text.files`), a URL repeated inside a
  WARC file. Kept pages are written as ``part-NNNNN.parquet`` closing at the part size
  (rows, or bytes of body), drops as ``dropped.parquet``, and every kept page is listed in
  ``pages.parquet`` (input part, seq, url, sha256 and size of the body, its output part and
  position there, the place it was read) for what needs every part.
- What needs every part is ingest's grouping (:mod:`tasks.text.ingest_group`): a URL read
  in an earlier WARC file (``duplicate_url``: the first in file order wins, as one reader
  would have done) and a body identical to the previous ingest's (``unchanged``). Only
  input parts that lose pages that way are rewritten, by :func:`settle_part`: their parts
  without those rows, their drops with those rows appended.
- ``seq`` is a record's position in its input part (drops included), so "first" means the
  same thing on one worker or sixty-four.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.text.pages import Drop, Page, drop_row, page_row
from tasks.text.tally import part_funnel
from tasks.text.warc import read_warc

PAGES = "pages.parquet"
DROPPED = "dropped.parquet"

PAGES_SCHEMA = pa.schema(
    [
        pa.field("file", pa.int32()),
        pa.field("seq", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("part", pa.int32()),
        pa.field("pos", pa.int32()),
        pa.field("place", pa.string()),
    ]
)


def part_name(n: int) -> str:
    return f"part-{n:05d}.parquet"


GROUP_BYTES = 16 << 20
"""Body bytes of one Parquet row group of a part: a part is written a row group at a time."""


class _Chunks:
    """Kept pages written as parts that close at ``rows`` rows or once ``max_bytes`` of body is
    reached, each written a row group (:data:`GROUP_BYTES`) at a time as it fills.

    Why row groups: building a whole 128 MiB part as one Arrow table made every worker touch
    fresh memory for it, and on the build machine a new worker's first part cost 0.8 s more
    in ``from_pylist`` alone (first touches of new pages), its second 0.1 s more; a row group's
    buffers are reused from the first group on.
    """

    def __init__(self, out: Path, schema: pa.Schema, rows: int, max_bytes: int):
        self.out, self.schema, self.max_rows, self.max_bytes = out, schema, rows, max_bytes
        self.rows: list[dict] = []  # the row group being filled
        self.group_bytes = 0
        self.part_rows = self.bytes = 0  # of the part being written
        self.writer: pq.ParquetWriter | None = None
        self.counts: list[int] = []

    def add(self, row: dict) -> tuple[int, int]:
        """Buffer ``row``; returns its (part, row) position."""
        where = (len(self.counts), self.part_rows)
        self.rows.append(row)
        self.part_rows += 1
        self.bytes += len(row["body"])
        self.group_bytes += len(row["body"])
        if self.part_rows >= self.max_rows or self.bytes >= self.max_bytes:
            self.flush()
        elif self.group_bytes >= GROUP_BYTES:
            self._write_group()
        return where

    def _write_group(self) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.out / part_name(len(self.counts)), self.schema, compression="zstd")
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows, self.group_bytes = [], 0

    def flush(self) -> None:
        """Close the part being written (if it has rows)."""
        if self.rows:
            self._write_group()
        if self.writer is not None:
            self.writer.close()
            self.counts.append(self.part_rows)
            self.writer, self.part_rows, self.bytes = None, 0, 0


def read_file(path: Path, index: int, out: Path, *, verify: bool, max_record: int, **write) -> dict:
    """Read WARC file number ``index`` at ``path`` into ``out``: :func:`write_pages` of its records."""
    return write_pages(read_warc(path, verify, max_record), index, out, source="warc", place=path.name, **write)


def write_pages(
    items: Iterable[Page | Drop],
    index: int,
    out: Path,
    *,
    source: str,
    place: str,
    part_rows: int,
    part_bytes: int,
    raw_schema: pa.Schema,
    dropped_schema: pa.Schema,
    make_doc_id,
) -> dict:
    """Input part number ``index``'s pages and drops (``items``, in order) into ``out`` (see the
    module docstring). ``source`` is the rows' source column; ``place`` says where a page was
    read when the page itself does not (its ``where``).

    Returns ``funnel`` (documents in, kept, dropped by reason: words are counted from
    extract on), ``parts`` (rows of each part), ``dropped`` (rows of ``dropped.parquet``)
    and ``first_drop`` ([url, detail] of the first record given up, or None).
    """
    chunks = _Chunks(out, raw_schema, part_rows, part_bytes)
    pages: list[dict] = []
    dropped: list[dict] = []
    reasons: list[str | None] = []  # per record: None kept, else why not
    first_drop = None
    for seq, item in enumerate(items):
        if isinstance(item, Drop):
            reasons.append(item.reason)
            first_drop = first_drop or [item.url, item.detail]
            dropped.append(drop_row(item, make_doc_id(item.url), source))
            continue
        reasons.append(None)
        chunk, row = chunks.add(page_row(item, make_doc_id(item.url), source))
        pages.append(
            {
                "file": index,
                "seq": seq,
                "url": item.url,
                "sha256": hashlib.sha256(item.body).hexdigest(),
                "size": len(item.body),
                "part": chunk,
                "pos": row,
                "place": item.where or place,
            }
        )
    chunks.flush()
    pq.write_table(pa.Table.from_pylist(pages, schema=PAGES_SCHEMA), out / PAGES)
    pq.write_table(pa.Table.from_pylist(dropped, schema=dropped_schema), out / DROPPED)
    return {
        "funnel": part_funnel([None] * len(reasons), reasons),
        "parts": chunks.counts,
        "dropped": len(dropped),
        "first_drop": first_drop,
    }


DETAILS = {
    "duplicate_url": "{where}: URL already read in an earlier file",
    "unchanged": "{where}: body identical to the previous ingest's",
}


def settle_part(
    part, out: Path, read_dir: str, removals: str, dropped_schema: pa.Schema, make_doc_id, source: str
) -> dict:
    """Input part ``part``'s outputs of the read step (``read_dir``) less the pages that the
    grouping listed for it (its ``removals`` folder: seq, part, pos, reason, place), into ``out``:
    parts renumbered without empty ones (an untouched part is linked, not copied), the
    removed pages appended to the drops in file order.

    Returns ``parts`` (rows of each part) and ``dropped`` (rows of ``dropped.parquet``).
    """
    read_dir = Path(read_dir)
    by_chunk: dict[int, dict[int, dict]] = {}
    for gone in pq.read_table(removals).to_pylist():
        by_chunk.setdefault(gone["part"], {})[gone["pos"]] = gone
    counts: list[int] = []
    new_drops: dict[int, dict] = {}  # seq -> drop row
    n = 0
    while (src := read_dir / part_name(n)).exists():
        removed, dst = by_chunk.get(n, {}), out / part_name(len(counts))
        if not removed:
            _link(src, dst)
            counts.append(pq.ParquetFile(src).metadata.num_rows)
        else:
            table = pq.read_table(src)
            heads = table.select(["url", "fetched_at", "http_status"])
            for row, gone in removed.items():
                page = heads.slice(row, 1).to_pylist()[0]
                detail = DETAILS[gone["reason"]].format(where=gone["place"])
                drop = Drop(page["url"], gone["reason"], detail, page["fetched_at"], page["http_status"])
                new_drops[gone["seq"]] = drop_row(drop, make_doc_id(drop.url), source)
            kept = table.filter(pa.array([i not in removed for i in range(table.num_rows)]))
            if kept.num_rows:
                pq.write_table(kept, dst, compression="zstd")
                counts.append(kept.num_rows)
        n += 1
    added = pa.Table.from_pylist([new_drops[s] for s in sorted(new_drops)], schema=dropped_schema)
    dropped = pa.concat_tables([pq.read_table(read_dir / DROPPED), added])
    pq.write_table(dropped, out / DROPPED)
    return {"parts": counts, "dropped": dropped.num_rows}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
