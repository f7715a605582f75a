"""The data path at scale: real HTML pages in gzipped WARC files, lmforge on 1 and 2 workers and on Ray.

The corpus: every HTML page of four Debian documentation packages (``rust-doc``,
``openjdk-17-doc``, ``python3.11-doc``, ``debian-handbook``; downloaded with ``apt-get
download`` and unpacked, not installed), written round-robin into ``--files`` gzipped
WARC files as HTTP responses, cached in ``.cache/scale-corpus/``.

lmforge: the data chain of ``flows/data_refresh.py`` (ingest, extract, dedup, filter,
augment, tokenizer, shards) with the demo profile's stage settings, each stage called
as the flow calls it (without Prefect), in a fresh child process and a fresh store per
run; with ``--workers`` local workers and, with ``--ray``, on a two-node Ray cluster
started here (``ray start`` twice, one CPU each). Per stage: wall seconds, documents in
and out, input MB (the WARC files for ingest, the input artifact's files otherwise),
docs/s, MB/s, cores busy (CPU seconds of the process tree, Ray's processes included,
per wall second) and peak memory (PSS of the tree). Every run's artifacts must have the
same content digests: the engine and the worker count change nothing.

The tool a user would pick instead, datatrove, with ``--datatrove-python`` (the Python of a
virtualenv with datatrove installed: see ``bench/datatrove_pipeline.py``, its closest
pipeline to lmforge's data path) on the same files with the same worker counts, one task
per WARC file, measured the same way (wall, cores busy, peak PSS of its process tree). Its
tokenizer is the one lmforge's first run trained, its language model the one lmforge uses.

``--repeat N`` runs every local configuration N times, interleaved (lmforge 1, 2 workers,
datatrove 1, 2, then again), since these machines are noisy: the report quotes medians
and ratios of medians; the per-stage rows are those of the median run.

    python bench/scale.py [--files 10] [--workers 1,2] [--ray] [--datatrove-python DT_VENV/bin/python] [--repeat 3]

Writes ``bench/results/scale.json`` and ``bench/results/scale.md``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from bench.measure import TreeMeter, measured_child  # noqa: E402

PACKAGES = ("rust-doc", "openjdk-17-doc", "python3.11-doc", "debian-handbook")
CORPUS = ROOT / ".cache" / "scale-corpus"
HOST = "docs.debian.example"


# --- the corpus --------------------------------------------------------------------------


def unpack(package: str) -> Path:
    """The package's files, unpacked from its .deb under CORPUS/x/<package> (cached)."""
    tree = CORPUS / "x" / package
    if (tree / ".done").exists():
        return tree
    debs = CORPUS / "deb"
    debs.mkdir(parents=True, exist_ok=True)
    for old in debs.glob(f"{package}_*.deb"):
        old.unlink()
    get = ["apt-get", "download", package]
    if subprocess.run(get, cwd=debs, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(get, cwd=debs, check=True)
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(next(debs.glob(f"{package}_*.deb"))), str(tree)], check=True)
    (tree / ".done").touch()
    return tree


def pages(package: str) -> list[tuple[str, Path]]:
    """(url, file) of every HTML page of the package, in path order; symbolic links left out (copies)."""
    tree = unpack(package)
    found = []
    for path in sorted(tree.rglob("*")):
        name = path.name.lower()
        if path.is_symlink() or not path.is_file() or not name.endswith((".html", ".htm", ".html.gz")):
            continue
        rel = path.relative_to(tree).as_posix().removesuffix(".gz")
        found.append((f"http://{HOST}/{package}/{rel}", path))
    return found


def build_corpus(files: int) -> dict:
    """Write the pages into ``files`` gzipped WARC files (cached); returns the corpus description."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = CORPUS / f"warc-{files}"
    described = out / "corpus.json"
    if described.exists():
        return json.loads(described.read_text())
    shutil.rmtree(out, ignore_errors=True)
    CORPUS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CORPUS, prefix="warc-"))
    streams = [open(tmp / f"docs-{i:03d}.warc.gz", "wb") for i in range(files)]
    writers = [WARCWriter(s, gzip=True) for s in streams]
    counts = {}
    n = 0
    try:
        for package in PACKAGES:
            listed = pages(package)
            counts[package] = len(listed)
            for url, path in listed:
                body = path.read_bytes()
                if path.name.endswith(".gz"):
                    body = gzip.decompress(body)
                headers = StatusAndHeaders(
                    "200 OK",
                    [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                    protocol="HTTP/1.1",
                )
                w = writers[n % files]
                w.write_record(w.create_warc_record(url, "response", payload=BytesIO(body), http_headers=headers))
                n += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written corpus left beside the cached ones
        raise
    finally:
        for s in streams:
            s.close()
    corpus = {
        "pages": n,
        "packages": counts,
        "files": files,
        "warc_bytes": sum(p.stat().st_size for p in tmp.glob("*.warc.gz")),
        "dir": str(out),
    }
    (tmp / "corpus.json").write_text(json.dumps(corpus, indent=2))
    tmp.rename(out)
    return corpus


# --- lmforge -----------------------------------------------------------------------------


def profile(warcs: Path, store: Path, workers: int, engine: str, address: str):
    """The demo profile's stage settings, reading the WARC files, with the given execution."""
    from flows.config import PipelineConfig, load_config

    demo = load_config(ROOT / "configs" / "demo.yaml").model_dump()
    demo["store"] = str(store)
    demo["ingest"] = {"kind": "warc", "warc": {"paths": [str(warcs / "*.warc.gz")]}}
    demo["execution"] = {"workers": workers, "engine": engine, "address": address}
    return PipelineConfig.model_validate(demo)


def run_chain(args: argparse.Namespace) -> dict:
    """The data chain in this process, stage by stage, each measured; the artifacts' digests."""
    from flows.data_refresh import CHAIN
    from storage.artifact import Store

    also = None
    if args.ray_temp_dir:
        from tests.ray_cluster import RayNodes

        also = RayNodes(args.address, args.ray_temp_dir, args.ray_port).processes
    warcs = Path(args.warcs)
    config = profile(warcs, Path(args.store), args.workers, args.engine, args.address)
    store = Store(config.store)
    out, rows = {}, []
    for link in CHAIN:
        run = importlib.import_module(link.task.fn.__module__).run
        inputs = {name: out[source] for name, source in link.inputs.items()}
        kwargs = dict(inputs)
        if link.split:
            kwargs["split"] = config.split
        if link.parts:
            kwargs["execution"] = config.execution
        with TreeMeter(also=also) as meter:
            result = run(store, getattr(config, link.stage), **kwargs)
        out[link.stage] = result
        first = next(iter(inputs.values()), None)
        if first is None:  # ingest reads the WARC files
            in_bytes = sum(p.stat().st_size for p in warcs.glob("*.warc.gz"))
        else:
            in_bytes = sum(f.bytes for f in first.files)
        docs_in = result.counters.get("docs_in", first.counters.get("docs_out") if first else None)
        rows.append(
            {
                "stage": link.stage,
                "seconds": round(meter.seconds, 2),
                "docs_in": docs_in,
                "docs_out": result.counters.get("docs_out"),
                "mb_in": round(in_bytes / 1e6, 1),
                "docs_per_s": round(docs_in / meter.seconds) if docs_in else None,
                "mb_per_s": round(in_bytes / 1e6 / meter.seconds, 2),
                "cores_busy": round(meter.cores_busy, 2),
                # the whole machine's CPU over the same time: on a quiet machine, a check of the above
                "machine_cores_busy": round(meter.machine_cpu_seconds / meter.seconds, 2),
                "peak_mib": meter.peak_mib,
                "digest": result.digest(),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"stages": rows, "tokens": out["shards"].counters.get("tokens_out")}


def run_lmforge(corpus: dict, workers: int, engine: str = "local", cluster=None) -> dict:
    """One run of the chain in a fresh child process on a fresh store."""
    store = CORPUS / "stores" / f"{engine}-{workers}"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--warcs", corpus["dir"], "--store", str(store)]
    cmd += ["--one-workers", str(workers), "--engine", engine]
    if cluster is not None:
        cmd += ["--address", cluster.address, "--ray-temp-dir", cluster.temp_dir, "--ray-port", str(cluster.port)]
    what = f"lmforge's data chain ({engine}, {workers} workers)"
    r = measured_child(cmd, what, also=cluster.processes if cluster else None)
    return r | {
        "engine": engine,
        "workers": workers,
        "seconds": round(sum(s["seconds"] for s in r["stages"]), 2),
        "store": str(store),
    }


def run_datatrove(corpus: dict, workers: int, python: str) -> dict:
    """datatrove's pipeline (bench/datatrove_pipeline.py) on the corpus, in its own virtualenv, measured."""
    from tasks.text.langid import model_path

    tokenizers = sorted((CORPUS / "stores").glob("local-*/tokenizer/*/tokenizer.json"))
    if not tokenizers:
        raise SystemExit("datatrove needs the tokenizer of an lmforge run: run lmforge first (--workers)")
    work = CORPUS / "datatrove" / f"w{workers}"
    cmd = [python, str(ROOT / "bench" / "datatrove_pipeline.py"), "--warcs", corpus["dir"], "--work", str(work)]
    cmd += ["--tasks", str(corpus["files"]), "--workers", str(workers)]
    cmd += ["--lid-model", str(model_path()), "--tokenizer", str(tokenizers[0])]
    r = measured_child(cmd, f"datatrove's pipeline ({workers} workers)")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "workers": workers,
        "seconds": round(r["seconds"], 2),
        "process_seconds": r["process_seconds"],
        "peak_mib": r["peak_mib"],
        "cores_busy": r["cores_busy"],
        "stages": [
            {
                "stage": st["name"],
                "seconds": st["seconds"],
                "docs_in": st.get("docs_in"),
                "docs_out": st.get("docs_out"),
            }
            for st in r["stages"]
        ],
        "datatrove": r.get("datatrove"),
        "extractor": r.get("extractor"),
    }


def median_runs(runs: list[dict]) -> dict:
    """The run of median total seconds (the lower middle one of an even count), with every run's seconds."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2] | {
        "runs_seconds": [r["seconds"] for r in runs],
        "runs_digests": [[s.get("digest") for s in r["stages"]] for r in runs],
    }


def run_on_ray(corpus: dict) -> dict:
    from tests.ray_cluster import running_ray_cluster

    with running_ray_cluster(nodes=2) as cluster:
        return run_lmforge(corpus, 2, "ray", cluster) | {"nodes": 2}


# --- the report --------------------------------------------------------------------------


def report(result: dict) -> str:
    m, c = result["machine"], result["corpus"]
    lines = [
        f"# The data path at scale ({result['date']}; {describe(m)})",
        "",
        f"{c['pages']:,} HTML pages of {', '.join(c['packages'])} in {c['files']} gzipped WARC files "
        f"({c['warc_bytes'] / 1e6:,.0f} MB). lmforge: the data chain with the demo profile's stage settings; "
        "cores busy: CPU seconds of the process tree per wall second; peak: PSS of the tree (Ray's processes "
        "included on Ray). **all**: seconds are the stages' sum; cores busy and peak are the whole child "
        "process's, its start-up included.",
        "",
        "| run | stage | seconds | docs in | docs out | MB in | docs/s | MB/s | cores busy | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["lmforge"]:
        name = f"lmforge, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        name += " on Ray (2 nodes x 1 CPU)" if r["engine"] == "ray" else ""
        for s in r["stages"]:
            lines.append(
                f"| {name} | {s['stage']} | {s['seconds']:.1f} | {_n(s['docs_in'])} | {_n(s['docs_out'])} | "
                f"{s['mb_in']:,.1f} | {_n(s['docs_per_s'])} | {s['mb_per_s']:.2f} | {s['cores_busy']:.2f} | "
                f"{s['peak_mib']:,} |"
            )
        lines.append(
            f"| {name} | **all** | **{r['seconds']:.1f}** | | | | | | {r['cores_busy']:.2f} | {r['peak_mib']:,} |"
        )
    for r in result.get("datatrove", []):
        name = f"datatrove {r['datatrove']}, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        for s in r["stages"]:
            lines.append(
                f"| {name} | {s['stage']} | {s['seconds']:.1f} | {_n(s['docs_in'])} | {_n(s['docs_out'])} | | | | | |"
            )
        lines.append(
            f"| {name} | **all** | **{r['seconds']:.1f}** | | | | | | {r['cores_busy']:.2f} | {r['peak_mib']:,} |"
        )
    return "\n".join(lines + [""] + [f"- {x}" for x in notes(result)]) + "\n"


def _n(x) -> str:
    return "" if x is None else f"{x:,}"


def notes(result: dict) -> list[str]:
    local = {r["workers"]: r for r in result["lmforge"] if r["engine"] == "local"}
    ray = [r for r in result["lmforge"] if r["engine"] == "ray"]
    out = []
    every = [d for r in result["lmforge"] for d in r.get("runs_digests", [[s["digest"] for s in r["stages"]]])]
    digests = {tuple(d) for d in every}
    out.append(
        f"every lmforge run published the same artifacts (content digests, all {len(every)} runs)"
        if len(digests) == 1
        else "the lmforge runs published DIFFERENT artifacts"
    )
    if 1 in local and 2 in local:
        runs = len(local[2].get("runs_seconds", [1]))
        out.append(
            f"the data path on 2 workers takes {local[2]['seconds'] / local[1]['seconds']:.2f}x its 1-worker time"
            + (
                f" (medians of {runs} runs: 1 worker {local[1]['runs_seconds']}, 2 workers {local[2]['runs_seconds']})"
                if runs > 1
                else ""
            )
        )
        by_stage = {s["stage"]: s for s in local[1]["stages"]}
        for s in local[2]["stages"]:
            one = by_stage[s["stage"]]
            out.append(
                f"{s['stage']}: 2 workers {s['seconds'] / one['seconds']:.2f}x the 1-worker time, "
                f"{s['cores_busy']:.2f} cores busy"
            )
    for r in result.get("datatrove", []):
        if r["workers"] in local:
            ours = local[r["workers"]]
            out.append(
                f"datatrove ({r['extractor']} extraction) on {r['workers']} worker(s): {r['seconds']:.1f} s, "
                f"{r['seconds'] / ours['seconds']:.2f}x lmforge's {ours['seconds']:.1f} s"
                + (f" (medians of {len(r['runs_seconds'])} runs)" if len(r.get("runs_seconds", [])) > 1 else "")
            )
    if ray and 2 in local:
        out.append(
            f"on Ray (2 one-CPU nodes, this machine): {ray[0]['seconds'] / local[2]['seconds']:.2f}x 2 local workers"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10, help="WARC files the corpus is written into")
    ap.add_argument("--workers", default="1,2", help="local worker counts to run lmforge with")
    ap.add_argument("--ray", action="store_true", help="also run on a two-node Ray cluster started here")
    ap.add_argument(
        "--datatrove-python", default="", help="Python of a virtualenv with datatrove: also run its pipeline"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each local configuration; the report quotes medians")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="scale", help="results file name, without .json/.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warcs", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--one-workers", dest="workers_one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--address", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ray-temp-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ray-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.workers = args.workers_one
        print(json.dumps(run_chain(args)))
        return
    t0 = time.perf_counter()
    corpus = build_corpus(args.files)
    print(f"corpus: {corpus['pages']:,} pages, {corpus['warc_bytes'] / 1e6:,.0f} MB ({time.perf_counter() - t0:.0f} s)")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "corpus": corpus, "lmforge": []}
    counts = [int(x) for x in args.workers.split(",")]
    ours: dict[int, list] = {w: [] for w in counts}
    theirs: dict[int, list] = {w: [] for w in counts}
    for repeat in range(args.repeat):
        for w in counts:
            ours[w].append(run_lmforge(corpus, w))
            print(f"lmforge, {w} worker(s), run {repeat + 1}: {ours[w][-1]['seconds']:.1f} s", flush=True)
        for w in counts if args.datatrove_python else ():
            theirs[w].append(run_datatrove(corpus, w, args.datatrove_python))
            print(f"datatrove, {w} worker(s), run {repeat + 1}: {theirs[w][-1]['seconds']:.1f} s", flush=True)
    result["lmforge"] = [median_runs(ours[w]) for w in counts]
    if args.datatrove_python:
        result["datatrove"] = [median_runs(theirs[w]) for w in counts]
    if args.ray:
        result["lmforge"].append(run_on_ray(corpus))
        print(f"lmforge on Ray: {result['lmforge'][-1]['seconds']:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
