"""Folder ingest: a directory of HTML pages into Parquet parts, lmforge on 1 and 2 workers beside a hand-written reader.

The folder: the four Debian documentation packages that ``bench/scale.py`` unpacks
(``rust-doc``, ``openjdk-17-doc``, ``python3.11-doc``, ``debian-handbook``, under
``.cache/scale-corpus/x``), every ``.html``, ``.htm`` and ``.txt`` file in it.

lmforge: ``ingest`` with ``kind: files`` and ``part_size.rows`` (default 5,000 files a
part), in a fresh child process and a fresh store per run, with 1 and 2 local workers; its
artifacts must have the same content digest whatever the worker count.

What a user would write instead: a script that walks the folder (``os.walk``), then reads
every wanted file and writes its URL, modification time and bytes into zstd Parquet files
of the same number of rows (pyarrow), in one process or on a ``multiprocessing`` pool of 2,
without lmforge's per-page drop reasons, content hash or validators. Both are timed the same way (wall seconds, cores busy and peak PSS of
the process tree). Every file is read once before the first run, so all runs find the page
cache warm; ``--repeat N`` interleaves the runs, and the report quotes medians.

    python bench/ingest_folder.py [--part-rows 5000] [--repeat 3]

Writes ``bench/results/ingest_folder.json`` and ``bench/results/ingest_folder.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from bench.measure import measured_child  # noqa: E402
from bench.scale import CORPUS, PACKAGES, unpack  # noqa: E402

ENDINGS = (".html", ".htm", ".txt")
STORES = CORPUS / "folder-stores"


def run_lmforge(folder: Path, workers: int, part_rows: int) -> dict:
    """lmforge's folder ingest in this process (the child of :func:`timed`)."""
    from storage.artifact import Store
    from tasks import ingest
    from tasks.parts.core import Execution

    store = STORES / f"lmforge-{workers}"
    shutil.rmtree(store, ignore_errors=True)
    cfg = ingest.IngestConfig(kind="files", files={"root": str(folder)}, part_size={"rows": part_rows})
    m = ingest.run(Store(store), cfg, execution=Execution(workers=workers))
    return {
        "docs_in": m.counters["docs_in"],
        "docs_out": m.counters["docs_out"],
        "parts": len(m.files_with_prefix("part-")),
        "digest": m.digest(),
    }


def run_by_hand(folder: Path, part_rows: int, workers: int) -> dict:
    """The reader a user would write: list the folder, then read and write Parquet parts of
    ``part_rows`` files, in this process or on a ``multiprocessing`` pool of ``workers``."""
    from multiprocessing import Pool

    out = STORES / f"by-hand-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.lower().endswith(ENDINGS) and os.path.isfile(path):
                paths.append(path)
    jobs = [
        (out / f"part-{i // part_rows:05d}.parquet", paths[i : i + part_rows]) for i in range(0, len(paths), part_rows)
    ]
    if workers == 1:
        for job in jobs:
            _write_part(job)
    else:
        with Pool(workers) as pool:
            pool.map(_write_part, jobs, chunksize=1)
    return {"docs_in": len(paths), "docs_out": len(paths), "parts": len(jobs), "digest": None}


def _write_part(job: tuple[Path, list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest, paths = job
    rows = []
    for path in paths:
        with open(path, "rb") as f:
            rows.append({"url": Path(path).as_uri(), "mtime": os.fstat(f.fileno()).st_mtime, "body": f.read()})
    pq.write_table(pa.Table.from_pylist(rows), dest, compression="zstd")


def timed(tool: str, workers: int, args: argparse.Namespace) -> dict:
    """One run in a fresh child process, its process tree measured."""
    cmd = [sys.executable, __file__, "--child", tool, "--one-workers", str(workers), "--part-rows", str(args.part_rows)]
    r = measured_child(cmd, f"{tool} on {workers} worker(s)")
    return r | {"tool": tool, "workers": workers, "seconds": round(r["seconds"], 2)}


def child(args: argparse.Namespace) -> None:
    folder = CORPUS / "x"
    import pyarrow.parquet  # noqa: F401  (imports are paid once per process in a flow: not timed)

    if args.child == "lmforge":
        import tasks.ingest  # noqa: F401
    t0 = time.perf_counter()
    if args.child == "lmforge":
        r = run_lmforge(folder, args.workers_one, args.part_rows)
    else:
        r = run_by_hand(folder, args.part_rows, args.workers_one)
    print(json.dumps(r | {"seconds": time.perf_counter() - t0}))


def warm(folder: Path) -> tuple[int, int]:
    """Read every wanted file once (the page cache then holds them all); (files, bytes)."""
    files = size = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if name.lower().endswith(ENDINGS) and path.is_file():
                files += 1
                size += len(path.read_bytes())
    return files, size


def report(result: dict) -> str:
    m, f = result["machine"], result["folder"]
    lines = [
        f"# Folder ingest ({result['date']}; {describe(m)})",
        "",
        f"{f['files']:,} files ({f['bytes'] / 1e6:,.0f} MB) of {', '.join(PACKAGES)}, parts of "
        f"{result['part_rows']:,} files; medians of {result['repeat']} interleaved runs, page cache warm. "
        "seconds: the ingest in its child process (start-up and imports excluded); cores busy and peak PSS: the child's "
        "process tree.",
        "",
        "| run | seconds | runs | docs kept | parts | cores busy | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        runs = ", ".join(f"{s:.1f}" for s in r["runs_seconds"])
        lines.append(
            f"| {r['name']} | {r['seconds']:.1f} | {runs} | {r['docs_out']:,} | {r['parts']} | "
            f"{r['cores_busy']:.2f} | {r['peak_mib']:,} |"
        )
    by = {r["name"]: r for r in result["runs"]}
    one, two = by["lmforge, 1 worker"], by["lmforge, 2 workers"]
    hand, hand2 = by["by hand, 1 process"], by["by hand, 2 processes"]
    lines += [
        "",
        f"- lmforge on 2 workers takes {two['seconds'] / one['seconds']:.2f}x its 1-worker time; "
        f"the hand-written reader on 2 processes {hand2['seconds'] / hand['seconds']:.2f}x its 1-process time",
        f"- lmforge takes {one['seconds'] / hand['seconds']:.2f}x the hand-written reader's time on 1 "
        f"worker / process, {two['seconds'] / hand2['seconds']:.2f}x on 2",
        f"- lmforge's artifacts the same on 1 and 2 workers, every run: {result['same_artifacts']}",
        "- the hand-written reader keeps no drop reasons, content hashes or validators, cannot refresh "
        "incrementally, and has no key, checkpoints or retries",
    ]
    return "\n".join(lines) + "\n"


def median_of(runs: list[dict], name: str) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2] | {"name": name, "runs_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part-rows", type=int, default=5000, help="files in one part")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration; the report quotes medians")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", choices=("lmforge", "by-hand"), help=argparse.SUPPRESS)
    ap.add_argument("--one-workers", dest="workers_one", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    for package in PACKAGES:
        unpack(package)
    files, size = warm(CORPUS / "x")
    configs = [
        ("lmforge", 1, "lmforge, 1 worker"),
        ("lmforge", 2, "lmforge, 2 workers"),
        ("by-hand", 1, "by hand, 1 process"),
        ("by-hand", 2, "by hand, 2 processes"),
    ]
    runs: dict[str, list[dict]] = {name: [] for *_, name in configs}
    for repeat in range(args.repeat):
        for tool, workers, name in configs:
            runs[name].append(timed(tool, workers, args))
            print(f"{name}, run {repeat + 1}: {runs[name][-1]['seconds']:.1f} s", flush=True)
    digests = {r["digest"] for name in runs if name.startswith("lmforge") for r in runs[name]}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "folder": {"files": files, "bytes": size, "packages": list(PACKAGES)},
        "part_rows": args.part_rows,
        "repeat": args.repeat,
        "same_artifacts": len(digests) == 1,
        "runs": [median_of(runs[name], name) for *_, name in configs],
    }
    shutil.rmtree(STORES, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest_folder.json").write_text(json.dumps(result, indent=2))
    (out / "ingest_folder.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
