"""Per-stage figures of the demo, and dedup side by side with what a user would pick instead.

1. Stage timings: read from a demo run's ``summary.json`` (``make demo`` writes
   ``runs/demo/summary.json``): wall seconds, documents and tokens per stage.
2. Near-duplicate detection on the demo's extracted handbook pages, in this process:
   lmforge's dedup stage (exact + MinHash, band keys grouped in DuckDB, union-find)
   against datasketch's in-memory ``MinHashLSH`` (insert + query, the usual recipe),
   with the same shingles (word 5-grams), permutations (112) and bands (14 x 8).
   Median of ``--repeats`` runs each, and how many documents each marks as duplicates.

    python bench/stages.py [--summary runs/demo/summary.json] [--repeats 3]

Writes ``bench/results/stages.json`` and ``bench/results/stages.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasketch import LeanMinHash, MinHash, MinHashLSH  # noqa: E402

from bench.machine import describe, machine  # noqa: E402
from storage.artifact import Store, read_table  # noqa: E402
from tasks import dedup  # noqa: E402
from tasks.text.minhash import normalize  # noqa: E402


def datasketch_lsh(texts: list[str], cfg: dedup.DedupConfig) -> int:
    """datasketch's recipe: one MinHash per document, query the LSH, insert if new; returns duplicates."""
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    dups = 0
    for i, text in enumerate(texts):
        words = normalize(text).split()
        shingles = {" ".join(words[j : j + cfg.ngram]) for j in range(max(1, len(words) - cfg.ngram + 1))}
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([s.encode() for s in shingles])
        m = LeanMinHash(m)
        if lsh.query(m):
            dups += 1
        else:
            lsh.insert(str(i), m)
    return dups


def bench_dedup(store: Store, repeats: int) -> dict:
    extracts = sorted((store.root / "extract").glob("*/manifest.json"))
    if not extracts:
        raise SystemExit(f"no extract artifact under {store.root}: run `make demo` first")
    docs = store.load("extract", extracts[-1].parent.name)
    texts = read_table(docs, columns=["text"]).column("text").to_pylist()
    cfg = dedup.DedupConfig()
    ours, theirs = [], []
    ours_dups = theirs_dups = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Store(tmp)
            # The dedup stage reads its input from the store: give it a copy of the extract artifact.
            import shutil

            shutil.copytree(docs.dir, scratch.root / "extract" / docs.key)
            src = scratch.load("extract", docs.key)
            t0 = time.perf_counter()
            out = dedup.run(scratch, cfg, src)
            ours.append(time.perf_counter() - t0)
            ours_dups = sum(v["docs"] for v in out.counters["dropped"].values())
        t0 = time.perf_counter()
        theirs_dups = datasketch_lsh(texts, cfg)
        theirs.append(time.perf_counter() - t0)
    words = sum(len(t.split()) for t in texts)
    return {
        "documents": len(texts),
        "words": words,
        "lmforge": {
            "seconds": statistics.median(ours),
            "runs": ours,
            "duplicates_dropped": ours_dups,
            "docs_per_s": len(texts) / statistics.median(ours),
        },
        "datasketch_minhashlsh": {
            "seconds": statistics.median(theirs),
            "runs": theirs,
            "duplicates_found": theirs_dups,
            "docs_per_s": len(texts) / statistics.median(theirs),
        },
        "note": "lmforge also drops exact duplicates first and writes band keys + kept/dropped Parquet; datasketch's count is near-duplicates by LSH query",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summary", default=str(ROOT / "runs" / "demo" / "summary.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    summary = json.loads(Path(args.summary).read_text())
    if all(s.get("cached") for s in summary["stages"].values()):
        raise SystemExit(
            f"{args.summary} is a rerun served from cache: time a run on a fresh store "
            "(e.g. `rm -rf .lmforge/demo && make demo`)"
        )
    store = Store(summary["store"])
    stages = {
        n: {k: s.get(k) for k in ("seconds", "cached", "docs_in", "docs_out", "words_out")}
        for n, s in summary["stages"].items()
    }
    result = {
        "machine": machine(),
        "demo_run": {"summary": args.summary, "total_seconds": summary["seconds"], "stages": stages},
        "dedup": bench_dedup(store, args.repeats),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(json.dumps(result, indent=2))
    d = result["dedup"]
    lines = [
        f"# Demo stages and dedup ({describe(result['machine'])})",
        "",
        f"Demo run: {summary['seconds']:.0f} s for the pipeline (setup excluded).",
        "",
        "| stage | seconds | cached | docs in | docs out | words out |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for n, s in stages.items():

        def fmt(v):
            return "" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.1f}"

        lines.append(
            f"| {n} | {fmt(s['seconds'])} | {'yes' if s['cached'] else 'no'} | {fmt(s['docs_in'])} | {fmt(s['docs_out'])} | {fmt(s['words_out'])} |"
        )
    lines += [
        "",
        f"## Dedup on the demo's {d['documents']:,} extracted pages ({d['words']:,} words), median of {len(d['lmforge']['runs'])}",
        "",
        "| tool | seconds | docs/s | duplicates |",
        "|---|---:|---:|---:|",
        f"| lmforge dedup stage (exact + MinHash, DuckDB bands) | {d['lmforge']['seconds']:.2f} | {d['lmforge']['docs_per_s']:,.0f} | {d['lmforge']['duplicates_dropped']:,} |",
        f"| datasketch MinHashLSH (in memory) | {d['datasketch_minhashlsh']['seconds']:.2f} | {d['datasketch_minhashlsh']['docs_per_s']:,.0f} | {d['datasketch_minhashlsh']['duplicates_found']:,} |",
        "",
        d["note"] + ".",
    ]
    (out / "stages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
