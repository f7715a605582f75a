"""A scratch DuckDB database for a stage's global step: bounded memory, spilling to disk.

A global step (dedup's grouping, ingest's URL grouping) must not grow with the corpus: it
runs in DuckDB on a database file in the stage's work directory with ``memory_limit``
set, so past the ceiling DuckDB spills to ``<work>/spill`` instead of taking more memory.
Nothing of it outlives the step: a killed run's leftovers are removed on the next open,
and the step is redone from the part outputs, which are the checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb


class SpillingDuckDB:
    """A connection (``.con``) to a fresh database under ``work``; :meth:`close` removes it and its spill."""

    def __init__(self, work: Path, *, memory_mb: int, threads: int, name: str = "group.duckdb", tables: bool = True):
        """``tables``: the database holds tables that may outgrow the memory (a file under
        ``work``); without, only a query's intermediates spill and the database stays in
        memory (faster where the tables are small: a task's result of duplicates only)."""
        self.work, self.name = Path(work), name
        self._clean()
        (self.work / "spill").mkdir(parents=True)
        self.con = duckdb.connect(
            str(self.work / name) if tables else ":memory:",
            config={
                "memory_limit": f"{memory_mb}MB",
                "temp_directory": str(self.work / "spill"),
                "threads": max(1, threads),
                "preserve_insertion_order": False,
            },
        )
        if tables:
            # Closing would first checkpoint the WAL into the file that close() then deletes:
            # 0.13 s of ingest's 3.7 s on 2 workers on the scale corpus (cProfile), for nothing.
            self.con.execute("PRAGMA disable_checkpoint_on_shutdown")

    def _clean(self) -> None:
        for name in (self.name, f"{self.name}.wal"):
            (self.work / name).unlink(missing_ok=True)
        shutil.rmtree(self.work / "spill", ignore_errors=True)

    def close(self) -> None:
        self.con.close()
        self._clean()


def sql_path(path: Path) -> str:
    """``path`` quoted for a SQL string literal (COPY ... TO '<path>')."""
    return str(path).replace("'", "''")
