"""Serving throughput and latency: `lmforge serve` with and without batching, and a hand-written transformers server.

The model is the demo's finetuned model, taken from a store (``--store``, default
``.lmforge/demo``: run ``make demo`` first) and exported here with the current code
(ONNX fp32/INT8 and the serving graphs for lmforge, the Hugging Face directory for the
baseline). Prompts are the first ``--prompt-tokens`` tokens of held-out documents of the
store's latest dataset.

Servers, driven by 1, 4, 16 and 64 concurrent clients (every client
sends ``--requests-per-client`` requests one after the other, ``--new-tokens`` new tokens
each, temperature 0; a request may stop early at end of text):

- ``lmforge serve --precision P`` (continuous batching, max batch 64), for each precision
  (INT8 and fp32 by default: batching pays off differently on each, see the README),
- ``lmforge serve --precision P --no-batching`` (the same server, one sequence per step;
  up beside the batching one, their runs taking turns: this machine's speed drifts by
  tens of percent within minutes, and a ratio of runs far apart would measure the drift),
- what a user would write by hand: FastAPI + ``transformers`` ``generate`` per request on
  the HF directory (``bench/hf_server.py``).

Results go to ``bench/results/serve.json``/``.md`` (``--name`` for another name), or
``serve-<backend>-<device>`` for another backend (``--backend torch --device cuda
--precisions bf16`` on a GPU host), with the machine they ran on (:mod:`bench.machine`).
Reported per run: generated tokens per second (all clients), time to first token (p50,
streamed; the hand-written server does not stream, so its first token is its last) and
request latency p50 / p99, and errors.

    .venv/bin/python bench/serve.py                      # about 10 minutes on 2 cores

For a GPU host without the store (or without this project's pins), export here and
carry the folder: ``--prepare-only DIR`` writes the export, the HF directory and the
prompts into DIR and stops; ``--prepared DIR`` benchmarks from it:

    .venv/bin/python bench/serve.py --prepare-only /tmp/serve-prepared
    python bench/serve.py --prepared /tmp/serve-prepared --backend torch --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402

CLIENTS = (1, 4, 16, 64)
PROMPTS_FILE = "prompts.json"
SERVERS = ("engine", "batching", "no-batching", "by-hand")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(store_dir: Path, out: Path, n_prompts: int, prompt_tokens: int) -> tuple[Path, Path, list[str]]:
    """Export the store's finetuned model (ONNX for lmforge, HF for the baseline) and pick prompts."""
    import torch

    from model.checkpoint import load_model
    from model.export import export_model
    from model.hf import save_hf
    from storage.artifact import Store
    from tasks.modeling.subsets import eval_docs, select
    from tasks.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    store = Store(store_dir)
    published = [
        store.load("finetune", p.name) for p in (store.root / "finetune").glob("*/") if not p.name.startswith(".")
    ]
    published = [m for m in published if m is not None]
    if not published:
        raise SystemExit(f"no finetuned model in {store_dir}: run `make demo` first (or pass --store)")
    tuned = max(published, key=lambda m: m.created_at)
    parent = {ref.split("/")[0]: store.load(*ref.split("/")) for ref in tuned.parents}
    shards, tok_m = parent["shards"], parent["tokenizer"]
    tok = load_tokenizer(tok_m)
    eot = int(shards.meta["eot_id"])
    docs = eval_docs(select(store, "bench", shards, None, "val"), shards.meta["dtype"], n_prompts)
    prompts = [tok.decode([int(t) for t in d.tokens[1 : 1 + prompt_tokens]]) for d in docs][:n_prompts]
    model = load_model(tuned.dir).eval()
    onnx_dir = out / "model"
    export_model(
        model, onnx_dir, eot_id=eot, val_docs=docs[:4], tokenizer_file=tok_m.path("tokenizer.json"), int4=False
    )
    hf_dir = save_hf(model, onnx_dir / "hf", tok_m.path("tokenizer.json"), eot)  # where the torch backend reads it
    (out / PROMPTS_FILE).write_text(json.dumps(prompts))
    return onnx_dir, hf_dir, prompts


def prepared(folder: Path) -> tuple[Path, Path, list[str]]:
    """What :func:`prepare` wrote into ``folder`` (``--prepare-only``), checked."""
    onnx_dir, hf_dir, prompts = folder / "model", folder / "model" / "hf", folder / PROMPTS_FILE
    for path in (onnx_dir / "export.json", hf_dir / "config.json", prompts):
        if not path.is_file():
            raise SystemExit(f"--prepared {folder}: {path} is missing (write it with --prepare-only {folder})")
    return onnx_dir, hf_dir, json.loads(prompts.read_text())


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not answer /health")


async def one_request(port: int, prompt: str, new_tokens: int, stream: bool) -> dict:
    """One completion over a raw asyncio connection: latency, time to first text, tokens generated.

    A load generator must not compete with the server it measures for this machine's two
    cores: an httpx client per thread took a whole core at 16 clients (measured), this one
    about a fifth of one. It reads only what it reports: the status, each event's start
    (to time the first text), and the ``usage`` at the end.
    """
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    first, tokens, writer = None, 0, None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + data)
        status = (await reader.readline()).split(b" ", 2)[1]
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}")
        if not stream:
            tokens = json.loads(await reader.readexactly(length))["usage"]["completion_tokens"]
        while stream and (line := await reader.readline()):
            if not line.startswith(b"data: "):
                continue  # chunk sizes and blank lines
            if line.startswith(b"data: [DONE]"):
                break
            if first is None and b'"text": ""' not in line:
                first = time.perf_counter() - t0
            if b'"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if writer is not None:
            writer.close()
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def drive(port: int, prompts: list[str], clients: int, per_client: int, new_tokens: int, stream: bool) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after the other."""

    async def client(i: int) -> list[dict]:
        return [
            await one_request(port, prompts[(i * per_client + j) % len(prompts)], new_tokens, stream)
            for j in range(per_client)
        ]

    async def everyone() -> list[dict]:
        return [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]

    t0 = time.perf_counter()
    results = asyncio.run(everyone())
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in ok), 3) if ok else None,
        "latency_p50_s": pct(lat, 0.5),
        "latency_p99_s": pct(lat, 0.99),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s (this machine is noisy), with every run's tokens/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs": len(runs), "tokens_per_s_all": [r["tokens_per_s"] for r in runs]}


def gpu_name(device: str) -> dict:
    """The GPU's name where the benchmark ran on one (``{}`` on the CPU)."""
    if device == "cpu":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(torch.device(device))}


def engine_alone(
    onnx_dir: Path,
    backend: str,
    device: str,
    precisions: list[str],
    threads: int,
    batch_sizes=(1, 16, 64),
    new_tokens: int = 64,
) -> list[dict]:
    """Tokens per second of the continuous batcher itself (no HTTP, no clients), on the backend
    ``lmforge serve`` loads for each precision with the server's threads: what batching can buy at most.

    At 16 rows it also says whether batching changed any token: the 16 requests run
    together and each alone, greedy, and the row counts the requests whose tokens are the
    same both ways (16/16 on the CPU graphs, as the tests require; on a GPU in bf16 other
    batch shapes may pick other kernels). On the onnx backend it profiles one 16-row run in
    onnxruntime and reports the share of the graph's time in ``GroupQueryAttention`` (per
    row and head on the CPU, so it grows with the batch where the weight MatMuls amortize).
    """
    import numpy as np

    from model.batching import ContinuousBatcher, GenerationRequest
    from model.onnx_generate import ExportedModel
    from model.serving.engine import load_lm

    export = ExportedModel(onnx_dir)
    rng = np.random.default_rng(0)
    prompts = [[export.eot_id, *rng.integers(1, 1000, 24).tolist()] for _ in range(max(batch_sizes))]

    def run(make_cache, batch: int, first: int = 0) -> tuple[float, list[list[int]]]:
        """``batch`` requests (prompts ``first`` on) at once; tokens/s and each request's tokens."""
        b = ContinuousBatcher(make_cache(batch), export.block_size, None, batch, batch)
        gens = [b.submit(GenerationRequest(p, new_tokens, 0.0)) for p in prompts[first : first + batch]]
        t0, tokens = time.perf_counter(), 0
        while b.active:
            tokens += sum(1 for _, t in b.step() if t is not None)
        return tokens / (time.perf_counter() - t0), [g.tokens for g in gens]

    rows = []
    for precision in precisions:
        if backend == "onnx" and export.serving_graph(precision) is None:
            continue  # int4: no serving graph, the padded path is not what the server is measured on
        make_cache, _, _ = load_lm(export, backend, precision, device, threads)
        run(make_cache, 1)  # warm-up: CUDA's kernels and handles, onnxruntime's first-call allocations
        for batch in batch_sizes:
            runs = sorted(run(make_cache, batch)[0] for _ in range(3))
            rows.append({"precision": precision, "batch": batch, "tokens_per_s": round(runs[1], 1), "threads": threads})
        together = run(make_cache, 16)[1]
        same = sum(together[i] == run(make_cache, 1, first=i)[1][0] for i in range(16))
        row16 = next(r for r in rows if (r["precision"], r["batch"]) == (precision, 16))
        row16["same_tokens_batched_and_alone"] = f"{same}/16"
        if backend == "onnx":
            row16["attention_share"] = attention_share(export, precision, threads, lambda cache: run(cache, 16))
    return rows


def attention_share(export, precision: str, threads: int, run) -> float:
    """The share of the serving graph's time in ``GroupQueryAttention`` over one profiled ``run``."""
    from bench.serve_ops import kernel_times, profiled_graph

    graph = profiled_graph(export.serving_graph(precision), threads, export.dir / f"profile-{precision}")
    run(graph.cache)
    by_op, _, _ = kernel_times(graph.session)
    return round(by_op["GroupQueryAttention"] / max(sum(by_op.values()), 1), 3)


def servers(args, onnx_dir: Path, hf_dir: Path, precisions: list[str]) -> list[dict[str, tuple[list[str], bool, int]]]:
    """The servers ``--servers`` asks for, in groups measured together: name -> (command, streams, repeats).

    A precision's batching and no-batching servers form one group: their runs alternate, so
    the ratio of a pair of runs is measured on the same state of this noisy machine.
    """
    lmforge = [sys.executable, "-m", "flows.cli", "serve", "--model", str(onnx_dir), "--backend", args.backend]
    lmforge += ["--device", args.device]
    groups = []
    for precision in precisions:
        cmd, group = lmforge + ["--precision", precision], {}
        if "batching" in args.servers:
            group[f"lmforge serve {precision} (continuous batching)"] = (
                cmd + ["--max-batch", "64", "--max-queue", "256"],
                True,
                args.repeats,
            )
        if "no-batching" in args.servers:
            group[f"lmforge serve {precision} --no-batching"] = (
                cmd + ["--no-batching", "--max-queue", "256"],
                True,
                args.repeats,
            )
        if group:
            groups.append(group)
    if "by-hand" in args.servers:
        groups.append(
            {
                "FastAPI + transformers generate (by hand)": (  # once: minutes per run, and far behind
                    [sys.executable, str(ROOT / "bench" / "hf_server.py"), "--model", str(hf_dir)]
                    + ["--device", args.device]
                    + (["--dtype", "bf16"] if args.device != "cpu" else []),
                    False,
                    1,
                )
            }
        )
    return groups


def measure(group: dict[str, tuple[list[str], bool, int]], prompts: list[str], args, rows: list) -> None:
    """The group's servers, each on a free port, driven by each client count: one run of each
    server in turn, ``repeats`` times (a row per server: its median run, every run's tokens/s in order).

    Each client count's rows are appended to ``rows`` as soon as they are measured (a stopped run keeps them).
    """
    procs, ports = [], {}
    try:
        for name, (cmd, stream, _) in group.items():
            ports[name] = free_port()
            procs.append(start(cmd + ["--port", str(ports[name])], ports[name]))
            asyncio.run(one_request(ports[name], prompts[0], 8, stream))  # warm-up
        repeats = max(r for _, _, r in group.values())
        for clients in args.clients:
            runs: dict[str, list[dict]] = {name: [] for name in group}
            for i in range(repeats):
                for name, (_, stream, own) in group.items():
                    if i < own:
                        runs[name].append(
                            drive(ports[name], prompts, clients, args.requests_per_client, args.new_tokens, stream)
                        )
            for name in group:
                rows.append({"server": name, **median_run(runs[name])})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(ROOT / ".lmforge" / "demo"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="runs per client count of lmforge's servers (median)")
    ap.add_argument("--backend", default="onnx", help="lmforge serve's backend: onnx (CPU) or torch")
    ap.add_argument("--device", default="cpu", help="with --backend torch: cpu or cuda")
    ap.add_argument(
        "--precisions",
        nargs="+",
        help="lmforge serve's precisions, each with and without batching (default: int8 and fp32 on onnx, bf16 on cuda)",
    )
    ap.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", help="results file name without .json/.md (default serve, or serve-<backend>-<device>)")
    ap.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        help="what to measure (default all): the batcher alone, lmforge serve with and without batching, by hand",
    )
    ap.add_argument("--prepare-only", metavar="DIR", help="write the export, HF directory and prompts to DIR; stop")
    ap.add_argument("--prepared", metavar="DIR", help="benchmark what --prepare-only wrote (no store needed)")
    args = ap.parse_args()

    if args.prepare_only:
        prepare(Path(args.store), Path(args.prepare_only), 64, args.prompt_tokens)
        print(f"prepared {args.prepare_only}: benchmark it with --prepared {args.prepare_only}")
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as tmp:
        if args.prepared:
            onnx_dir, hf_dir, prompts = prepared(Path(args.prepared))
        else:
            onnx_dir, hf_dir, prompts = prepare(Path(args.store), Path(tmp), 64, args.prompt_tokens)
        precisions = args.precisions or (["int8", "fp32"] if args.backend == "onnx" else ["bf16"])
        threads = max(1, (os.cpu_count() or 2) - 1)  # lmforge serve's default: one core for the HTTP loop
        signal.signal(signal.SIGTERM, stop)  # `timeout` (a GPU host lent for minutes): keep what was measured
        alone, rows, stopped = [], [], None
        try:
            if "engine" in args.servers:
                alone = engine_alone(
                    onnx_dir, args.backend, args.device, precisions, threads, new_tokens=args.new_tokens
                )
                print(json.dumps({"engine_alone": alone}), flush=True)
            for group in servers(args, onnx_dir, hf_dir, precisions):
                measure(group, prompts, args, rows)
        except KeyboardInterrupt:
            stopped = "stopped early (SIGTERM or Ctrl-C): only the rows below were measured"
            print(stopped, flush=True)

    result = {
        "machine": {**machine(), **gpu_name(args.device)},
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "engine_alone": alone,
        **({"stopped": stopped} if stopped else {}),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = "" if (args.backend, args.device) == ("onnx", "cpu") else f"-{args.backend}-{args.device}"
    name = args.name or f"serve{variant}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Serving the demo model ({result['date']}; {describe(m)},{' ' + m['gpu'] + ',' if 'gpu' in m else ''}"
        f" Python {m['python']})",
        "",
        f"{args.new_tokens} new tokens per request at temperature 0, {args.requests_per_client} requests per client,"
        f" prompts of {args.prompt_tokens} tokens from held-out documents; lmforge serve with `--backend {args.backend}"
        f" --device {args.device}` (default threads: all cores but one). Each lmforge row is the median of"
        f" {args.repeats} runs (tokens/s of each run beside it, in order). A precision's servers with and without"
        " batching run at once and take turns (one run of each, then again), so each ratio below is the median of"
        " runs measured side by side. Written by `bench/serve.py`.",
        *(["", f"**{stopped}**"] if stopped else []),
        "",
        "| server | clients | tokens/s | runs | TTFT p50 (s) | latency p50 (s) | latency p99 (s) | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        each = ", ".join(str(t) for t in r.get("tokens_per_s_all", [r["tokens_per_s"]]))
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['tokens_per_s']} | {each} | {r['ttft_p50_s']} | {r['latency_p50_s']}"
            f" | {r['latency_p99_s']} | {r['errors']} |"
        )
    by = {(r["server"], r["clients"]): r for r in rows}
    hand = "FastAPI + transformers generate (by hand)"
    lines.append("")
    for precision in precisions:
        for clients in args.clients:
            batched = by.get((f"lmforge serve {precision} (continuous batching)", clients))
            plain = by.get((f"lmforge serve {precision} --no-batching", clients))
            by_hand = by.get((hand, clients))
            if not (batched and plain):
                continue
            paired = [b / p for b, p in zip(batched["tokens_per_s_all"], plain["tokens_per_s_all"])]
            line = (
                f"- {precision}, {clients} client{'s' if clients > 1 else ''}: continuous batching"
                f" {statistics.median(paired):.2f}x the tokens/s of batching off (runs side by side:"
                f" {', '.join(f'{x:.2f}x' for x in paired)})"
            )
            if by_hand:
                line += f", {batched['tokens_per_s'] / by_hand['tokens_per_s']:.1f}x the hand-written server's"
            lines.append(line + ".")
    if alone:
        lines += [
            "",
            "The batcher alone (no HTTP, no clients competing for the cores) on what the server loads for each"
            " precision, with the server's threads, random prompts of 25 tokens (median of 3); at 16 sequences, whether"
            " batching changed any greedy token (16 requests together, then each alone: how many came out the same)"
            " and, on the onnx backend, the share of the graph's time in GroupQueryAttention (onnxruntime's profile):",
            "",
            "| precision | threads | sequences per step | tokens/s | vs 1 sequence | attention share |"
            " batched = alone (greedy) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        single = {r["precision"]: r["tokens_per_s"] for r in alone if r["batch"] == 1}
        for r in alone:
            gain = r["tokens_per_s"] / single[r["precision"]]
            share = f"{r['attention_share']:.0%}" if "attention_share" in r else ""
            lines.append(
                f"| {r['precision']} | {r['threads']} | {r['batch']} | {r['tokens_per_s']} | {gain:.2f}x | {share}"
                f" | {r.get('same_tokens_batched_and_alone', '')} |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
