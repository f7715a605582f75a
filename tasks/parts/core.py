"""What both engines of per-part work share: the parts, the execution settings, one part's run.

:class:`Execution` is the profile's ``execution:`` section; :class:`Part` one input file
of an artifact with its row range; :func:`run_part` runs a step on one part and publishes
its checkpoint; :func:`switches` / :func:`take_switches` carry the parent's ``LMFORGE_*``
variables to a worker with every job. See :mod:`tasks.parts` for the design.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import pyarrow.parquet as pq
from pydantic import Field, field_validator

from storage.artifact import ArtifactWriter, Manifest
from storage.atomic import new_temp_dir, publish_dir
from storage.faults import kill_point
from tasks.stage import StageConfig

RESULT = "result.json"


class Execution(StageConfig):
    """How wide the data stages' per-part steps run. Never part of an artifact's key: the
    results are the same whatever is set here."""

    workers: int = Field(
        0, ge=0, le=1024, description="Worker processes for the per-part steps; 0: every core of this machine."
    )
    memory_mb: int = Field(
        1024,
        ge=64,
        le=1 << 20,
        description="Memory ceiling (MiB) of a stage's global step (dedup's grouping in DuckDB, split among its tasks running at once); past it, it spills to disk under the store.",
    )

    engine: Literal["local", "ray"] = Field(
        "local",
        description="Who runs the per-part steps: worker processes on this machine, or a Ray cluster (pip install 'lmforge[ray]').",
    )
    address: str = Field(
        "",
        max_length=256,
        description="engine ray: the cluster to join: 'auto' (the cluster this machine is a node of), 'host:6379', or 'ray://host:10001' (Ray Client); empty starts Ray on this machine.",
    )

    @field_validator("address")
    @classmethod
    def _plain_address(cls, v: str) -> str:
        if v and (not v.isprintable() or any(c.isspace() for c in v)):
            raise ValueError("an address is 'auto', 'host:port' or 'ray://host:port', without spaces")
        return v

    def worker_count(self) -> int:
        """Local processes for the per-part steps (with Ray: how many parts run at once; 0 = the
        cluster's CPUs, known once connected)."""
        return self.workers or default_workers()


@dataclass(frozen=True)
class Part:
    """One input part: where it is, and which documents of the artifact it holds."""

    index: int
    name: str  # the input file, as the manifest lists it
    path: str
    start: int  # ordinal of its first row in the artifact
    rows: int
    bytes: int = 0  # its input's size as listed (0: not known); a map starts the biggest parts first


def input_parts(manifest: Manifest, prefix: str = "part") -> list[Part]:
    """The artifact's ``<prefix>-*.parquet`` files as parts, in artifact order, with their row ranges."""
    parts, start = [], 0
    for i, f in enumerate(e for e in manifest.files_with_prefix(prefix + "-") if e.path.endswith(".parquet")):
        path = str(manifest.path(f.path))
        rows = f.rows if f.rows is not None else pq.ParquetFile(path).metadata.num_rows
        parts.append(Part(i, f.path, path, start, rows, f.bytes))
        start += rows
    return parts


def add_part_files(w: ArtifactWriter, parts: Sequence[Part], dirs: Sequence[Path], names: dict[str, str]) -> None:
    """Put each part's finished files into the artifact: ``dirs[i]/<file>`` becomes
    ``<names[file]>-<part index>.parquet`` (a file a part did not write is skipped), so
    output part N comes from input part N whatever the number of workers."""
    for part, d in zip(parts, dirs):
        for filename, prefix in names.items():
            src = d / filename
            if src.exists():
                w.add_file(src, f"{prefix}-{part.index:05d}.parquet", pq.ParquetFile(src).metadata.num_rows)


def default_workers() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


THREAD_POOLS = ("RAYON_NUM_THREADS", "OMP_NUM_THREADS")
"""The thread pools a worker's libraries size from the environment: ``tokenizers`` (Rust's
rayon) and OpenMP. Each would take every core of the machine in every worker."""


def share_cores(threads: int) -> None:
    """Size this worker's library thread pools to its share of the cores, ``threads``.

    With one worker per core, a worker whose ``tokenizers`` starts a thread per core puts
    two threads on each core: encoding the scale benchmark's documents on 2 workers took
    4.9 s that way, 4.0 s with one thread each, and 4.8 s in one process with both cores (medians
    of 4, the 2-core build machine). Ray does the same for OpenMP in its tasks. Call it in a
    fresh worker, before those libraries start their pools; a variable the user set is left
    as it is.
    """
    threads = max(1, threads)
    for var in THREAD_POOLS:
        os.environ.setdefault(var, str(threads))
    import pyarrow

    pyarrow.set_cpu_count(threads)


def run_part(stage: str, step: str, fn: Callable, part: Part, step_dir: str, args: tuple) -> Any:
    """Run ``fn`` on one part and publish its outputs and result as ``<step_dir>/<index>``; returns the result."""
    final = Path(step_dir) / f"{part.index:05d}"
    tmp = new_temp_dir(final)
    try:
        result = fn(part, tmp, *args)
        result = json.loads(text := json.dumps(result))  # the same value, fresh or reused
        (tmp / RESULT).write_text(text)
        kill_point(f"{stage}/{step}/{part.index}")  # every output written, the part not published
        if not publish_dir(tmp, final, replace=False):  # another run finished it first: same content
            return read_result(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def read_result(part_dir: Path) -> Any:
    """A finished part's result: JSON, since nothing read back from the store is unpickled."""
    return json.loads((part_dir / RESULT).read_text())


SWITCHES = ("LMFORGE_",)
"""Environment variables a worker takes from its parent at every job (the fault switches of
:mod:`storage.faults` among them): a worker's own environment is fixed when it starts."""

LOCAL_ENV = (*SWITCHES, "AWS_")
"""What a local worker also takes: the object-store settings (a WARC ingest's worker
downloads its file from the bucket). A Ray node keeps its own: it may be elsewhere, with
other credentials."""


def switches(prefixes: tuple[str, ...] = SWITCHES) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def take_switches(given: dict[str, str], prefixes: tuple[str, ...] = SWITCHES, keep: tuple[str, ...] = ()) -> None:
    """Make this worker's variables of ``prefixes`` the parent's, as sent with a job (those in
    ``keep`` stay the worker's own)."""
    for k in [k for k in os.environ if k.startswith(prefixes) and k not in given and k not in keep]:
        del os.environ[k]
    os.environ.update({k: v for k, v in given.items() if k not in keep})
