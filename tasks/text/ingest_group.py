"""ingest's global step over every input part's pages: URLs repeated across WARC files, pages unchanged since the last ingest.

It runs in DuckDB under a memory ceiling past which it spills (:mod:`tasks.text.spill_db`),
over the ``pages.parquet`` index each input part's step left (:mod:`tasks.text.ingest_parts`:
file (the input part), seq, url, sha256, size, part, pos, place) and the previous ingest's ``validators-*``:

- ``duplicate_url``: every occurrence of a URL after its first in (file, seq) order. The
  reader already dropped repeats inside one file, so these are repeats across files (a
  folder's files have a URL each, so it has none), and
  the page kept is the one a single reader of all files in order would have kept;
- ``unchanged``: a first occurrence whose body hashes as the previous ingest recorded;
- this ingest's validators: one per URL, from its first occurrence, in (file, seq) order
  (unchanged pages included, so the next refresh still knows them);
- ``new``: first occurrences whose URL the previous ingest did not know.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from tasks.text.spill_db import SpillingDuckDB, sql_path

_VERDICT = """
CREATE TABLE verdict AS
SELECT p.file, p.seq, p.part, p.pos, p.place, p.url, p.sha256, p.size,
       CASE WHEN row_number() OVER (PARTITION BY p.url ORDER BY p.file, p.seq) > 1 THEN 'duplicate_url'
            WHEN v.sha256 = p.sha256 THEN 'unchanged' END AS reason,
       v.url IS NULL AS new
FROM pages p LEFT JOIN previous v ON v.url = p.url
"""


class PageGrouping:
    """``with PageGrouping(work, memory_mb=..., threads=...) as g: g.decide(pages, previous)``, then read its verdicts."""

    def __init__(self, work: Path, *, memory_mb: int, threads: int):
        self.db = SpillingDuckDB(Path(work), memory_mb=memory_mb, threads=threads)
        self.con = self.db.con

    def __enter__(self) -> "PageGrouping":
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    def decide(self, pages_files: list[str], previous_validators: list[str]) -> None:
        """Judge every page listed in ``pages_files`` against the others and against ``previous_validators``."""
        con = self.con
        con.execute("CREATE TABLE pages AS SELECT * FROM read_parquet($f)", {"f": pages_files})
        if previous_validators:
            con.execute("CREATE TABLE previous AS SELECT url, sha256 FROM read_parquet($f)", {"f": previous_validators})
        else:
            con.execute("CREATE TABLE previous (url VARCHAR, sha256 VARCHAR)")
        con.execute(_VERDICT)

    def removals(self, folder: Path) -> dict[int, dict[str, int]]:
        """Write the pages to remove as ``<folder>/file=<N>/*.parquet`` (seq, part, pos, reason,
        place), one folder per file that loses pages; returns ``{file: {reason: pages}}``."""
        counts: dict[int, dict[str, int]] = {}
        for file, reason, n in self.con.execute(
            "SELECT file, reason, count(*) FROM verdict WHERE reason IS NOT NULL GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            counts.setdefault(file, {})[reason] = n
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's: written again, whole
        if counts:
            self.con.execute(
                f"COPY (SELECT file, seq, part, pos, reason, place FROM verdict WHERE reason IS NOT NULL) "
                f"TO '{sql_path(folder)}' (FORMAT parquet, PARTITION_BY (file), OVERWRITE_OR_IGNORE)"
            )
        return counts

    def kept_totals(self) -> tuple[int, int]:
        """``(new, body_bytes)`` of the pages kept: how many have a URL the previous ingest did
        not know, and their bodies' bytes."""
        new, size = self.con.execute(
            "SELECT count(*) FILTER (WHERE new), coalesce(sum(size), 0) FROM verdict WHERE reason IS NULL"
        ).fetchone()
        return int(new), int(size)

    def validators(self, schema: pa.Schema, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """This ingest's validators, ``batch_rows`` at a time, in (file, seq) order."""
        reader = self.con.sql(
            "SELECT url, NULL::VARCHAR AS etag, NULL::VARCHAR AS last_modified, sha256, []::VARCHAR[] AS links "
            "FROM verdict WHERE reason IS DISTINCT FROM 'duplicate_url' ORDER BY file, seq"
        ).to_arrow_reader(batch_rows)
        for batch in reader:
            yield batch.cast(schema)


def removal_folder(folder: Path, file: int) -> Path:
    """Where :meth:`PageGrouping.removals` put file number ``file``'s pages to remove."""
    return Path(folder) / f"file={file}"
