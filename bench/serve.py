"""Serving throughput and latency: `lmforge serve` with and without batching, and a hand-written transformers server.

The model is the demo's finetuned model, taken from a store (``--store``, default
``.lmforge/demo``: run ``make demo`` first) and exported here with the current code
(ONNX fp32/INT8 and the serving graphs for lmforge, the Hugging Face directory for the
baseline). Prompts are the first ``--prompt-tokens`` tokens of held-out documents of the
store's latest dataset.

Servers, one at a time, each driven by 1, 4, 16 and 64 concurrent clients (every client
sends ``--requests-per-client`` requests one after the other, ``--new-tokens`` new tokens
each, temperature 0; a request may stop early at end of text):

- ``lmforge serve --precision P`` (continuous batching, max batch 64), for each precision
  (INT8 and fp32 by default: batching pays off differently on each, see the README),
- ``lmforge serve --precision P --no-batching`` (the same server, one sequence per step),
- what a user would write by hand: FastAPI + ``transformers`` ``generate`` per request on
  the HF directory (``bench/hf_server.py``).

Results go to ``bench/results/serve.json``/``.md``, or ``serve-<backend>-<device>`` for
another backend (``--backend torch --device cuda --precisions bf16`` on a GPU host).
Reported per run: generated tokens per second (all clients), time to first token (p50,
streamed; the hand-written server does not stream, so its first token is its last) and
request latency p50 / p99, and errors.

    .venv/bin/python bench/serve.py                      # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = (1, 4, 16, 64)


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
    hf_dir = save_hf(model, out / "hf", tok_m.path("tokenizer.json"), eot)
    return onnx_dir, hf_dir, prompts


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


def engine_alone(
    onnx_dir: Path, precisions: list[str], threads: int, batch_sizes=(1, 16, 64), new_tokens: int = 64
) -> list[dict]:
    """Tokens per second of the continuous batcher itself (no HTTP, no clients), on the serving
    graph of each precision with the server's threads: what batching can buy at most.

    At 16 rows it also profiles one run in onnxruntime and reports the share of the graph's
    time in ``GroupQueryAttention`` (per row and head on the CPU, so it grows with the batch
    where the weight MatMuls amortize).
    """
    import collections

    import numpy as np
    import onnxruntime as ort

    from model.batching import ContinuousBatcher, GenerationRequest
    from model.onnx_generate import ServingGraph
    from model.serving_graph import SERVE_FP32_FILE, SERVE_INT8_FILE

    meta = json.loads((onnx_dir / "export.json").read_text())
    files = {"int8": SERVE_INT8_FILE, "fp32": SERVE_FP32_FILE}

    def tokens_per_s(graph, batch: int) -> float:
        rng = np.random.default_rng(0)
        b = ContinuousBatcher(graph.cache(batch), meta["gpt_config"]["block_size"], None, batch, batch)
        for _ in range(batch):
            b.submit(GenerationRequest([meta["eot_id"], *rng.integers(1, 1000, 24).tolist()], new_tokens, 0.0))
        t0, tokens = time.perf_counter(), 0
        while b.active:
            tokens += sum(1 for _, t in b.step() if t is not None)
        return tokens / (time.perf_counter() - t0)

    rows = []
    for precision in (p for p in precisions if p in files):
        path = onnx_dir / files[precision]
        graph = ServingGraph(path, threads, spin=False)
        for batch in batch_sizes:
            runs = sorted(tokens_per_s(graph, batch) for _ in range(3))
            rows.append({"precision": precision, "batch": batch, "tokens_per_s": round(runs[1], 1), "threads": threads})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.enable_profiling = threads, True
        opts.profile_file_prefix = str(onnx_dir / f"profile-{precision}")
        graph.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        tokens_per_s(graph, 16)
        by_op: collections.Counter = collections.Counter()
        for event in json.loads(Path(graph.session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
        share = by_op["GroupQueryAttention"] / max(sum(by_op.values()), 1)
        for row in rows:
            if (row["precision"], row["batch"]) == (precision, 16):
                row["attention_share"] = round(share, 3)
    return rows


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
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as tmp:
        onnx_dir, hf_dir, prompts = prepare(Path(args.store), Path(tmp), 64, args.prompt_tokens)
        precisions = args.precisions or (["int8", "fp32"] if args.backend == "onnx" else ["bf16"])
        threads = max(1, (os.cpu_count() or 2) - 1)  # lmforge serve's default: one core for the HTTP loop
        alone = engine_alone(onnx_dir, precisions, threads, new_tokens=args.new_tokens)
        print(json.dumps({"engine_alone": alone}), flush=True)
        lmforge = [sys.executable, "-m", "flows.cli", "serve", "--model", str(onnx_dir), "--backend", args.backend]
        lmforge += ["--device", args.device]
        servers = {}  # name: (command, streams, repeats)
        for precision in precisions:
            cmd = lmforge + ["--precision", precision]
            servers[f"lmforge serve {precision} (continuous batching)"] = (
                cmd + ["--max-batch", "64", "--max-queue", "256"],
                True,
                args.repeats,
            )
            servers[f"lmforge serve {precision} --no-batching"] = (
                cmd + ["--no-batching", "--max-queue", "256"],
                True,
                args.repeats,
            )
        servers["FastAPI + transformers generate (by hand)"] = (  # once: minutes per run, and far behind
            [sys.executable, str(ROOT / "bench" / "hf_server.py"), "--model", str(hf_dir)],
            False,
            1,
        )
        rows = []
        for name, (cmd, stream, repeats) in servers.items():
            port = free_port()
            proc = start(cmd + ["--port", str(port)], port)
            try:
                asyncio.run(one_request(port, prompts[0], 8, stream))  # warm-up
                for clients in args.clients:
                    runs = [
                        drive(port, prompts, clients, args.requests_per_client, args.new_tokens, stream)
                        for _ in range(repeats)
                    ]
                    row = {"server": name, **median_run(runs)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    result = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "engine_alone": alone,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = "" if (args.backend, args.device) == ("onnx", "cpu") else f"-{args.backend}-{args.device}"
    (out / f"serve{variant}.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Serving the demo model ({result['date']}, {m['cores']} cores, {m['cpu']}, Python {m['python']})",
        "",
        f"{args.new_tokens} new tokens per request at temperature 0, {args.requests_per_client} requests per client,"
        f" prompts of {args.prompt_tokens} tokens from held-out documents; lmforge serve with `--backend {args.backend}"
        f" --device {args.device}` (default threads: all cores but one). Each lmforge row is the median of"
        f" {args.repeats} runs (tokens/s of each run beside it). Written by `bench/serve.py`.",
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
    by = {(r["server"], r["clients"]): r["tokens_per_s"] for r in rows}
    hand = "FastAPI + transformers generate (by hand)"
    lines.append("")
    for precision in precisions:
        for clients in args.clients:
            batched = by.get((f"lmforge serve {precision} (continuous batching)", clients))
            plain = by.get((f"lmforge serve {precision} --no-batching", clients))
            by_hand = by.get((hand, clients))
            if batched and plain and by_hand:
                lines.append(
                    f"- {precision}, {clients} client{'s' if clients > 1 else ''}: continuous batching"
                    f" {batched / plain:.2f}x the tokens/s of batching off, {batched / by_hand:.1f}x the hand-written server's."
                )
    lines += [
        "",
        "The batcher alone (no HTTP, no clients competing for the cores), each precision's serving graph with the"
        " server's threads, same prompts' length (median of 3); at 16 sequences, the share of the graph's time in"
        " GroupQueryAttention (onnxruntime's profile):",
        "",
        "| precision | threads | sequences per step | tokens/s | vs 1 sequence | attention share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    single = {r["precision"]: r["tokens_per_s"] for r in alone if r["batch"] == 1}
    for r in alone:
        gain = r["tokens_per_s"] / single[r["precision"]]
        share = f"{r['attention_share']:.0%}" if "attention_share" in r else ""
        lines.append(
            f"| {r['precision']} | {r['threads']} | {r['batch']} | {r['tokens_per_s']} | {gain:.2f}x | {share} |"
        )
    (out / f"serve{variant}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
