"""Serving through a flood of oversized prompts: what clients posting 1 MiB prompts cost the streams being served.

A prompt that cannot fit the context is refused by its size, before it is tokenized
(``Engine.tokens_at_least`` in ``model/serving/engine.py``): tokenizing takes the GIL and the
server's event loop for as long as the text is long. Here 16 clients stream completions
(64 new tokens, temperature 0, ``--requests-per-client`` each) from one ``lmforge serve``
while ``--flood`` other clients post 1 MiB prompts in a loop, one after the other, and the
same 16 clients alone, the runs taking turns (this machine's speed drifts within minutes).
Reported: the streaming clients' tokens/s (median of ``--repeats``, each run beside it),
the flood's requests per second and the statuses it got (all 400 when the guard works).

    .venv/bin/python bench/serve.py --prepare-only /tmp/serve-prepared   # once
    .venv/bin/python bench/serve_flood.py --prepared /tmp/serve-prepared
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from bench.serve import free_port, one_request, prepare, prepared, start  # noqa: E402

STREAMS = 16
FLOOD_BYTES = 1 << 20


async def flood_one(port: int, body: bytes, stop: asyncio.Event, statuses: Counter) -> None:
    """Post ``body`` again and again until ``stop``; count the statuses."""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            statuses[(await reader.readline()).split(b" ", 2)[1].decode()] += 1
            await reader.read()
            writer.close()
        except (OSError, IndexError) as e:
            statuses[type(e).__name__] += 1


async def one_run(port: int, prompts: list[str], per_client: int, flood: int) -> dict:
    body = json.dumps({"prompt": "a" * (FLOOD_BYTES - 100), "max_tokens": 4}).encode()
    stop, statuses = asyncio.Event(), Counter()
    flooders = [asyncio.create_task(flood_one(port, body, stop, statuses)) for _ in range(flood)]

    async def client(i: int) -> list[dict]:
        return [
            await one_request(port, prompts[(i * per_client + j) % len(prompts)], 64, True) for j in range(per_client)
        ]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(STREAMS))) for r in rs]
    wall = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*flooders)
    ok = [r for r in results if "error" not in r]
    return {
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "errors": len(results) - len(ok),
        "latency_p50_s": round(statistics.median(r["latency"] for r in ok), 3) if ok else None,
        "flood_requests_per_s": round(sum(statuses.values()) / wall, 1),
        "flood_statuses": dict(statuses),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(ROOT / ".lmforge" / "demo"))
    ap.add_argument("--prepared", metavar="DIR", help="what bench/serve.py --prepare-only wrote")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--flood", type=int, default=2, help="clients posting 1 MiB prompts in a loop")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-flood-") as tmp:
        if args.prepared:
            onnx_dir, _, prompts = prepared(Path(args.prepared))
        else:
            onnx_dir, _, prompts = prepare(Path(args.store), Path(tmp), 64, 24)
        port = free_port()
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", str(onnx_dir), "--port", str(port)]
        server = start(cmd + ["--precision", args.precision, "--max-batch", "64", "--max-queue", "256"], port)
        try:
            asyncio.run(one_request(port, prompts[0], 8, True))  # warm-up
            runs: dict[int, list[dict]] = {0: [], args.flood: []}
            for _ in range(args.repeats):
                for flood in runs:
                    runs[flood].append(asyncio.run(one_run(port, prompts, args.requests_per_client, flood)))
                    print(json.dumps({"flood": flood, **runs[flood][-1]}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)

    rows = []
    for flood, rs in runs.items():
        median = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        statuses = sum((Counter(r["flood_statuses"]) for r in rs), Counter())
        rows.append(
            {
                "flood": flood,
                **median,
                "flood_statuses": dict(statuses),
                "runs_tokens_per_s": [r["tokens_per_s"] for r in rs],
            }
        )
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_flood.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Serving through a flood of 1 MiB prompts ({result['date']}; {describe(m)})",
        "",
        f"{STREAMS} clients stream completions from one `lmforge serve --precision {args.precision}` (64 new tokens,"
        f" temperature 0, {args.requests_per_client} requests each) while 0 or {args.flood} other clients post"
        f" prompts of 1 MiB in a loop; runs take turns, median of {args.repeats}. Written by `bench/serve_flood.py`.",
        "",
        "| flooding clients | streams' tokens/s | runs | latency p50 (s) | stream errors | flood requests/s | flood statuses |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        runs_text = ", ".join(str(t) for t in r["runs_tokens_per_s"])
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["flood_statuses"].items())) or "-"
        lines.append(
            f"| {r['flood']} | {r['tokens_per_s']} | {runs_text} | {r['latency_p50_s']} | {r['errors']}"
            f" | {r['flood_requests_per_s']} | {statuses} |"
        )
    calm, flooded = rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]
    lines += ["", f"- with the flood the streams get {flooded / calm:.2f}x their tokens/s without it"]
    (out / "serve_flood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
