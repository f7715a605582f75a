"""extract's per-part step: the text of every page of one ingest part, in the part's worker.

Design decisions:

- One process per part extracts its pages itself: no page crosses a pipe (the pool of
  :class:`tasks.text.html.ExtractorPool` pickled every body to a child and back), and
  the stage spreads over every core or a Ray cluster like dedup and filter.
- A time limit per page still holds. resiliparse is C++ holding the GIL (a page of a few
  thousand unclosed nested tags takes seconds, 200,000 of them more than 20 minutes), so
  no Python thread or signal can stop it; :mod:`faulthandler`'s watchdog, a C thread,
  can: it ends the worker. Before each page the worker writes the page's row to
  ``<step>/<part>.watch/current``; the engine sees the worker die and retries the part
  (:class:`tasks.parts.partmap.PartMap`), and the retry reads what the dead worker was on:
  - the watchdog wrote its report: the page ran past the limit; it is dropped as
    ``extract_timeout``;
  - no report: the worker crashed, or was killed from outside (the out-of-memory killer,
    a person). A page on which the worker dies twice is dropped as ``extract_error``;
    once could be bad luck, and the page is tried again.
  The watchdog is re-armed at most once per ``timeout_seconds`` (re-arming starts a
  thread: about 100 us, as much as extracting a small page), so a page gets at least
  ``timeout_seconds`` and at most twice that.
- ``LMFORGE_EXTRACT_CRASH_MARK`` (:data:`CRASH_SWITCH`) makes a worker crash on the pages
  that contain it, to rehearse the second case (like ``LMFORGE_FAIL_STAGE``).
- Output files close at ``part_size`` within the part (``part-00000.parquet``... in the
  worker's folder); the stage numbers them across parts in order, so the artifact does
  not depend on the number of workers.
"""

from __future__ import annotations

import faulthandler
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.text.html import ExtractConfig, judge_text, outcome
from tasks.text.tally import part_funnel

COLUMNS = ["doc_id", "url", "source", "fetched_at", "content_type", "charset", "body"]
KEEP = ["doc_id", "url", "source", "fetched_at"]
IDLE = -1
CRASH_SWITCH = "LMFORGE_EXTRACT_CRASH_MARK"
"""Fault injection: a worker dies (exit code 3) on a page whose body contains this text,
as a crash in the extractor would. For rehearsing recovery and for the tests; unset, nothing happens."""


class Watch:
    """Which page of a part its worker is on, on disk, so that a retry after the worker's
    death knows which page killed it (see the module docstring)."""

    def __init__(self, folder: Path, timeout: float):
        self.folder, self.timeout = folder, timeout
        folder.mkdir(parents=True, exist_ok=True)
        self.report_path = folder / "watchdog.txt"
        self.blamed_path = folder / "blamed.json"
        self._fd: int | None = None
        self._report = None
        self._armed_at = 0.0

    def settle(self) -> dict[int, tuple[str, str]]:
        """The pages to drop unread, ``{row: (reason, detail)}``, after judging what a dead worker was on."""
        state = json.loads(self.blamed_path.read_text()) if self.blamed_path.exists() else {}
        blamed, deaths = state.get("blamed", {}), state.get("deaths", {})
        current = self.folder / "current"
        row = int(current.read_bytes() or IDLE) if current.exists() else IDLE
        if row != IDLE:
            report = self.report_path.read_text(errors="replace") if self.report_path.exists() else ""
            if report.startswith("Timeout"):
                blamed[str(row)] = ["extract_timeout", f"no result within {self.timeout:g}s"]
            else:
                deaths[str(row)] = deaths.get(str(row), 0) + 1
                if deaths[str(row)] >= 2:
                    blamed[str(row)] = ["extract_error", "the extraction process died on this page twice"]
            tmp = self.blamed_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"blamed": blamed, "deaths": deaths}))
            os.replace(tmp, self.blamed_path)
        return {int(r): (reason, detail) for r, (reason, detail) in blamed.items()}

    def __enter__(self) -> "Watch":
        self._fd = os.open(self.folder / "current", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._report = open(self.report_path, "w")
        return self

    def on(self, row: int) -> None:
        """The worker starts on ``row``: recorded, and the watchdog armed if it is due."""
        os.pwrite(self._fd, b"%12d" % row, 0)
        now = time.monotonic()
        if now - self._armed_at >= self.timeout:
            faulthandler.dump_traceback_later(2 * self.timeout, exit=True, file=self._report)
            self._armed_at = now

    def __exit__(self, *exc) -> None:
        faulthandler.cancel_dump_traceback_later()
        os.pwrite(self._fd, b"%12d" % IDLE, 0)
        os.close(self._fd)
        self._report.close()


def _chunks(sizes: list[int], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges closing at ``max_rows`` rows or once ``max_bytes`` is reached."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if i + 1 - start >= max_rows or total >= max_bytes:
            out.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _write(rows: list[dict], schema: pa.Schema, prefix: str, out: Path, cfg: ExtractConfig) -> list[int]:
    table = pa.Table.from_pylist(rows, schema=schema)
    counts = []
    for n, (a, b) in enumerate(_chunks([len(r["text"]) for r in rows], cfg.part_size.rows, cfg.part_size.max_bytes)):
        pq.write_table(table.slice(a, b - a), out / f"{prefix}-{n:05d}.parquet", compression="zstd")
        counts.append(b - a)
    return counts


def extract_part(part, out: Path, cfg: ExtractConfig, kept_schema: pa.Schema, dropped_schema: pa.Schema) -> dict:
    """Extract every page of ``part`` into ``out``: kept documents as ``part-NNNNN.parquet``,
    dropped ones (``dropped_reason``, ``detail``) as ``dropped-NNNNN.parquet``. Returns the
    part's funnel (``storage.documents.Funnel``'s attributes) and the pages dropped unread."""
    watch = Watch(out.parent / f"{part.index:05d}.watch", cfg.timeout_seconds)
    unread = watch.settle()
    crash_mark = os.environ.get(CRASH_SWITCH, "").encode()
    table = pq.read_table(part.path, columns=COLUMNS)
    kept, dropped, texts, reasons = [], [], [], []
    with watch:
        for row, page in enumerate(table.to_pylist()):
            if row in unread:
                reason, text, detail = unread[row][0], "", unread[row][1]
            else:
                watch.on(row)
                if crash_mark and crash_mark in page["body"]:
                    os._exit(3)  # fault injection: a crash in the extractor, on this page
                reason, text, detail = outcome((page["body"], page["content_type"], page["charset"]), cfg)
            reason, detail = judge_text(reason, text, detail, cfg)
            doc = {k: page[k] for k in KEEP} | {"text": text}
            texts.append(text)
            reasons.append(reason)
            if reason is None:
                kept.append(doc)
            else:
                dropped.append(doc | {"dropped_reason": reason, "detail": detail})
    return {
        "funnel": part_funnel(texts, reasons),
        "files": {
            "part": _write(kept, kept_schema, "part", out, cfg),
            "dropped": _write(dropped, dropped_schema, "dropped", out, cfg),
        },
        "unread": len(unread),
    }
