"""Dedup at scale: 100k, 300k and 1M synthetic documents, peak memory, throughput, recall and precision.

The corpus: distinct 300-word documents drawn from a vocabulary of about 20,000 random lowercase words, 10% of them
followed (later in the corpus, anywhere) by a planted near-duplicate, a copy with two
words replaced (word 5-gram Jaccard about 0.93). It is written once per size as an
extract artifact in Parquet parts of 20,000 rows, under ``.cache/bench/dedup-<n>``.

Each run is a fresh process (so its memory is its own) that runs the dedup stage with
``--workers`` 1 and 2, sampling the resident memory of its whole process tree (driver,
workers, DuckDB) every 50 ms; the peak is the largest sum. Recall: planted duplicates
dropped / planted; precision: planted duplicates among all dropped documents.

In the same script, the tool a user would pick instead: datatrove's four MinHash stages
(signatures, buckets, clusters, filter; 14 buckets x 8 hashes, word 5-grams, 64-bit
hashes, so the same LSH as ours) on the same Parquet parts with the same number of
tasks and workers, run by ``--datatrove-python`` (a Python with datatrove installed; it
is not one of lmforge's dependencies), its peak measured the same way.

    python bench/dedup_scale.py [--sizes 20000,100000,300000,1000000] [--workers 1,2] [--memory-mb 1024] \\
        [--ray-sizes 100000,300000 --name dedup_ray] \\
        [--datatrove-python /path/to/venv/bin/python --datatrove-sizes 20000 --datatrove-workers 2]

(datatrove 0.10 needs ``pip install datatrove[processing] spacy`` in its own venv: its
English word tokenizer is spaCy's, which makes its signature step about 60 documents a
second per worker here, so it runs at the smallest size only by default: 1M documents
would take it hours. Its executor runs here with ``start_method="fork"``.)

``--ray-sizes`` also runs those sizes on a two-node Ray cluster started on this machine
with ``ray start`` (one CPU a node, ``execution.engine: ray``); its peak memory counts Ray's
own processes too.

Writes ``bench/results/<name>.json`` and ``bench/results/<name>.md`` (name: ``dedup_scale``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench.machine import describe, machine  # noqa: E402
from bench.measure import TreeMeter  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
PART_ROWS = 20_000
WORDS = 300
PLANTED = 0.10


def build_corpus(n: int) -> Path:
    """The extract artifact of ``n`` documents (cached); returns the store root."""
    from storage.artifact import Store
    from storage.documents import make_doc_id

    root = CACHE / f"dedup-{n}"
    store = Store(root)
    if store.load("extract", "synthetic") is not None:
        return root
    rng = np.random.default_rng(n)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(
        sorted({"".join(rng.choice(letters, int(rng.integers(3, 11)))) for _ in range(20_000)}), dtype=object
    )
    n_dups = int(n * PLANTED)
    n_orig = n - n_dups
    # Each planted duplicate goes after its original, anywhere later in the corpus.
    originals = rng.choice(n_orig, size=n_dups, replace=False)
    keys = np.concatenate([np.arange(n_orig, dtype=float), originals + rng.uniform(0.5, n_orig - originals)])
    kinds = np.concatenate([np.zeros(n_orig, dtype=np.int8), np.ones(n_dups, dtype=np.int8)])
    which = np.concatenate([np.arange(n_orig), originals])
    order = [("dup" if kinds[j] else "orig", int(which[j])) for j in np.argsort(keys, kind="stable")]
    with store.writer("extract", "synthetic") as w:
        rows: list[dict] = []
        words_of: dict[int, np.ndarray] = {}
        planted = set(int(o) for o in originals)
        for kind, i in order:
            if kind == "orig":
                idx = np.random.default_rng([n, i]).integers(0, len(vocab), WORDS)
                if i in planted:
                    words_of[i] = idx
                text, url = " ".join(vocab[idx]), f"https://bench.example/{i}"
            else:
                idx = words_of.pop(i).copy()
                r = np.random.default_rng([n, i, 1])
                idx[r.choice(WORDS, 2, replace=False)] = r.integers(0, len(vocab), 2)
                text, url = " ".join(vocab[idx]), f"https://bench.example/{i}/copy"
            rows.append(
                {
                    "doc_id": make_doc_id(url, text),
                    "url": url,
                    "source": "bench",
                    "fetched_at": "2026-12-03T00:00:00Z",
                    "text": text,
                }
            )
            if len(rows) == PART_ROWS:
                w.write_table(pa.Table.from_pylist(rows))
                rows = []
        if rows:
            w.write_table(pa.Table.from_pylist(rows))
        w.meta["planted"] = n_dups
    return root


def run_lmforge(root: Path, workers: int, memory_mb: int, engine: str = "local", address: str = "") -> dict:
    """One dedup run in this process (called in a fresh child by :func:`main`)."""
    import shutil

    from storage.artifact import Store, read_table
    from tasks import dedup
    from tasks.parts.core import Execution

    store = Store(root)
    shutil.rmtree(root / "dedup", ignore_errors=True)
    shutil.rmtree(root / "_work", ignore_errors=True)
    docs = store.load("extract", "synthetic")
    with TreeMeter() as mem:
        t0 = time.perf_counter()
        execution = Execution(workers=workers, memory_mb=memory_mb, engine=engine, address=address)
        out = dedup.run(store, dedup.DedupConfig(), docs=docs, execution=execution)
        seconds = time.perf_counter() - t0
    dropped = read_table(out, "dropped", columns=["url", "dropped_reason"])
    urls = dropped.column("url").to_pylist()
    found = sum(u.endswith("/copy") for u in urls)
    planted = docs.meta["planted"]
    n = out.counters["docs_in"]
    return {
        "docs": n,
        "engine": engine,
        "workers": workers,
        "seconds": round(seconds, 2),
        "docs_per_s": round(n / seconds),
        "docs_per_s_per_worker": round(n / seconds / workers),
        "peak_mib": round(mem.peak / 2**20),
        "recall": round(found / planted, 4),
        "precision": round(found / max(len(urls), 1), 4),
        "dropped": len(urls),
        "candidate_pairs": out.meta["candidate_pairs"],
        "steps_seconds": out.meta["execution"].get("seconds"),
    }


DATATROVE = r"""
import json, sys, tempfile, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import ParquetWriter
from datatrove.utils.hashing import HashConfig

data, tasks = sys.argv[1], int(sys.argv[2])
cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
with tempfile.TemporaryDirectory() as tmp:
    reader = lambda: ParquetReader(data, glob_pattern="part-*.parquet", text_key="text", id_key="url")
    stages = [
        [reader(), MinhashDedupSignature(output_folder=f"{tmp}/sigs", config=cfg)],
        [MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets", config=cfg)],
        [MinhashDedupCluster(input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/ids", config=cfg)],
        [reader(), MinhashDedupFilter(input_folder=f"{tmp}/ids", exclusion_writer=ParquetWriter(f"{tmp}/removed")),
         ParquetWriter(f"{tmp}/kept")],
    ]
    n_tasks = [tasks, cfg.num_buckets, 1, tasks]
    t0 = time.perf_counter()
    for i, (pipeline, n) in enumerate(zip(stages, n_tasks)):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(tasks, n), logging_dir=f"{tmp}/logs{i}",
                              skip_completed=False, start_method="fork").run()
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq, glob
    removed = [u for f in glob.glob(f"{tmp}/removed/*.parquet") for u in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
print(json.dumps({"seconds": seconds, "removed_urls": removed}))
"""


def run_datatrove(python: str, root: Path, workers: int, planted: int) -> dict:
    data = next((root / "extract").glob("*/manifest.json")).parent
    proc = subprocess.Popen(
        [python, "-c", DATATROVE, str(data), str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeMeter(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"datatrove failed:\n{err[-3000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    removed = got["removed_urls"]
    found = sum(u.endswith("/copy") for u in removed)
    return {
        "workers": workers,
        "seconds": round(got["seconds"], 2),
        "peak_mib": round(mem.peak / 2**20),
        "recall": round(found / planted, 4),
        "precision": round(found / max(len(removed), 1), 4),
        "dropped": len(removed),
    }


def run_on_ray(root: Path, memory_mb: int) -> dict:
    """Dedup on a two-node Ray cluster started here (``ray start`` twice, one CPU each), as a user starts one.

    Time and recall come from the child that runs the stage; the peak counts the child and
    every process of the cluster (GCS, raylets, agents, workers), sampled from here.
    """
    from tests.ray_cluster import running_ray_cluster

    with running_ray_cluster(nodes=2) as cluster:
        cmd = [sys.executable, __file__, "--root", str(root), "--one-workers", "2", "--memory-mb", str(memory_mb)]
        cmd += ["--engine", "ray", "--address", cluster.address]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with TreeMeter(proc.pid, also=cluster.processes) as mem:
            out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"lmforge dedup on Ray failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_mib": round(mem.peak / 2**20), "nodes": 2}


def child(args: argparse.Namespace) -> None:
    print(json.dumps(run_lmforge(Path(args.root), args.one_workers, args.memory_mb, args.engine, args.address)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,100000,300000,1000000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--datatrove-python", default=None)
    ap.add_argument(
        "--datatrove-sizes", default="20000", help="sizes datatrove runs at (slow here: about 60 docs/s a worker)"
    )
    ap.add_argument("--datatrove-workers", default="1,2")
    ap.add_argument(
        "--ray-sizes", default="", help="sizes also run on a two-node Ray cluster started here (one CPU a node)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="dedup_scale", help="results file name, without .json/.md")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--one-workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--address", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.root:
        return child(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "memory_mb": args.memory_mb,
        "runs": [],
        "datatrove": [],
    }
    for n in sizes:
        t0 = time.perf_counter()
        root = build_corpus(n)
        print(f"corpus of {n:,}: {time.perf_counter() - t0:.0f} s", flush=True)
        for w in workers:
            cmd = [sys.executable, __file__, "--root", str(root), "--one-workers", str(w)]
            done = subprocess.run(cmd + ["--memory-mb", str(args.memory_mb)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"lmforge dedup failed at {n} docs, {w} workers:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
        if str(n) in args.ray_sizes.split(","):
            r = run_on_ray(root, args.memory_mb)
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
        if args.datatrove_python and str(n) in args.datatrove_sizes.split(","):
            from storage.artifact import Store

            planted = Store(root).load("extract", "synthetic").meta["planted"]
            for w in (int(x) for x in args.datatrove_workers.split(",")):
                r = {"docs": n} | run_datatrove(args.datatrove_python, root, w, planted)
                result["datatrove"].append(r)
                print("datatrove", json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Dedup at scale ({result.get('date', '')}; {describe(m)})",
        "",
        f"Synthetic 300-word documents, {PLANTED:.0%} planted near-duplicates (two words replaced, 5-gram Jaccard ~0.93);",
        f"memory ceiling of the grouping step {result['memory_mb']} MiB. Peak: memory (PSS) of the whole process tree.",
        "",
        "| tool | docs | workers | seconds | docs/s | docs/s per worker | peak MiB | recall | precision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| lmforge{' on Ray, 2 nodes' if r.get('engine') == 'ray' else ''} | {r['docs']:,} | {r['workers']} | {r['seconds']:.1f} | {r['docs_per_s']:,} | "
            f"{r['docs_per_s_per_worker']:,} | {r['peak_mib']:,} | {r['recall']:.4f} | {r['precision']:.4f} |"
        )
    for r in result["datatrove"]:
        lines.append(
            f"| datatrove MinHash (4 stages) | {r['docs']:,} | {r['workers']} | {r['seconds']:.1f} | "
            f"{r['docs'] / r['seconds']:,.0f} | {r['docs'] / r['seconds'] / r['workers']:,.0f} | {r['peak_mib']:,} | "
            f"{r['recall']:.4f} | {r['precision']:.4f} |"
        )
    runs = result["runs"]
    by = {(r["docs"], r["workers"]): r for r in runs if r.get("engine", "local") == "local"}
    on_ray = {r["docs"]: r for r in runs if r.get("engine") == "ray"}
    sizes = sorted({r["docs"] for r in runs})
    notes = []
    base = 100_000 if 100_000 in sizes else sizes[0]  # the reference size; 20k is one part, one process
    for w in sorted({r["workers"] for r in runs}):
        if (base, w) in by and (sizes[-1], w) in by and sizes[-1] != base:
            ratio = by[sizes[-1], w]["peak_mib"] / by[base, w]["peak_mib"]
            notes.append(f"peak at {sizes[-1]:,} / at {base:,} with {w} worker(s): {ratio:.2f}x")
    for n in sizes:
        if (n, 1) in by and (n, 2) in by:
            notes.append(f"{n:,} docs: 2 workers take {by[n, 2]['seconds'] / by[n, 1]['seconds']:.2f}x the time of 1")
        if n in on_ray and (n, 2) in by:
            notes.append(
                f"{n:,} docs: on a 2-node Ray cluster {on_ray[n]['seconds'] / by[n, 2]['seconds']:.2f}x the time of "
                f"2 local workers, {on_ray[n]['peak_mib'] / by[n, 2]['peak_mib']:.2f}x the memory (Ray's daemons included)"
            )
        theirs = {r["workers"]: r for r in result["datatrove"] if r["docs"] == n}
        for w, t in theirs.items():
            if (n, w) in by:
                notes.append(
                    f"{n:,} docs, {w} worker(s): datatrove / lmforge time {t['seconds'] / by[n, w]['seconds']:.2f}x"
                )
    return "\n".join(lines + [""] + [f"- {x}" for x in notes]) + "\n"


if __name__ == "__main__":
    main()
