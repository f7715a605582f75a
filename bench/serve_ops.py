"""Where a decode step's time goes in the serving graph, by operator, at 1 to 64 sequences per step.

Why continuous batching buys what it buys on a CPU: the weight MatMuls are shared by the
sequences of a step (one matrix product of ``rows x d`` instead of ``rows`` of ``1 x d``),
while onnxruntime's CPU ``GroupQueryAttention`` does a small product per sequence and head
over that sequence's KV cache, so its time grows with the batch. This profiles the serving
graph (``serve.int8.onnx`` / ``serve.onnx`` of an exported model) in onnxruntime, with the
server's threads, while the batcher decodes ``rows`` random prompts of 25 tokens for 64 new
tokens, and splits the kernels' time of the decode steps (not the prefills) by operator.

    .venv/bin/python bench/serve_ops.py                 # runs/demo/model, after `make demo`

Results: ``bench/results/serve_ops.json`` / ``.md``. onnxruntime's profiler adds a few
microseconds to every kernel, which more than doubles a one-sequence step: the shares and
the growth with the batch from 4 sequences up are what to read, not the totals.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402

MATMULS = ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits")


def profiled_graph(path: Path, threads: int, prefix: Path):
    """The serving graph at ``path`` in an onnxruntime session that profiles every kernel (files at ``prefix``)."""
    import onnxruntime as ort

    from model.onnx_generate import ServingGraph

    graph = ServingGraph(path, threads, spin=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = threads, True
    opts.profile_file_prefix = str(prefix)
    graph.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return graph


def kernel_times(session, skip_runs: int = 0) -> tuple[collections.Counter, collections.Counter, int]:
    """Ends ``session``'s profile: kernel microseconds and calls by operator over its graph runs
    after the first ``skip_runs``, and how many runs that is."""
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
    by_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if skip_runs == 0 or any(start <= e["ts"] <= end for start, end in runs):
            by_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    return by_op, calls, len(runs)


def profile(model_dir: Path, precision: str, rows: int, threads: int, new_tokens: int, work: Path) -> dict:
    """Kernel time per decode step by operator, ``rows`` sequences per step."""
    import numpy as np

    from model.batching import ContinuousBatcher, GenerationRequest
    from model.onnx_generate import ExportedModel

    export = ExportedModel(model_dir)
    path = export.serving_graph(precision)
    if path is None:
        raise SystemExit(f"{model_dir} has no {precision} serving graph")
    graph = profiled_graph(path, threads, work / f"profile-{precision}-{rows}")
    rng = np.random.default_rng(0)
    batcher = ContinuousBatcher(graph.cache(rows), export.block_size, None, rows, max_prefills=rows)
    for _ in range(rows):
        batcher.submit(GenerationRequest([export.eot_id, *rng.integers(1, 1000, 24).tolist()], new_tokens, 0.0))
    while batcher.active:
        batcher.step()
    # The first step prefills every row, one call each, then decodes: the prefills are left out.
    by_op, calls, steps = kernel_times(graph.session, skip_runs=rows)
    layers = calls["GroupQueryAttention"] // max(steps, 1)
    total = sum(by_op.values())
    matmul = sum(v for k, v in by_op.items() if k in MATMULS)
    attention = by_op["GroupQueryAttention"]
    return {
        "precision": precision,
        "rows": rows,
        "threads": threads,
        "decode_steps": steps,
        "kernel_us_per_step": round(total / steps, 1),
        "kernel_us_per_token": round(total / steps / rows, 1),
        "matmul_us_per_step": round(matmul / steps, 1),
        "attention_us_per_step": round(attention / steps, 1),
        "attention_us_per_sequence_and_layer": round(attention / steps / rows / max(layers, 1), 2),
        "attention_share": round(attention / total, 3),
        "by_op_us_per_step": {k: round(v / steps, 1) for k, v in by_op.most_common()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "model"), help="an exported model directory")
    ap.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="(lmforge serve's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="serve_ops", help="results file name, without .json/.md")
    args = ap.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "export.json").is_file():
        raise SystemExit(f"{model_dir} is not an exported model directory (run `make demo` first, or pass --model)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-ops-") as tmp:
        for precision in args.precisions:
            for n in args.rows:
                rows.append(profile(model_dir, precision, n, args.threads, args.new_tokens, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# The serving graph's decode step by operator ({result['date']}; {describe(result['machine'])},"
        f" Python {result['machine']['python']})",
        "",
        f"onnxruntime's profile of `{model_dir.name}`'s serving graph, {args.threads} thread(s) (lmforge serve's"
        f" default), the batcher decoding N random prompts of 25 tokens for {args.new_tokens} new tokens; kernel time"
        " of the decode steps only (the prefills left out), averaged per step. Written by `bench/serve_ops.py`.",
        "",
        "| precision | sequences per step | kernel µs per step | µs per token | weight MatMuls µs per step |"
        " GroupQueryAttention µs per step | attention µs per sequence and layer | attention share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['rows']} | {r['kernel_us_per_step']} | {r['kernel_us_per_token']}"
            f" | {r['matmul_us_per_step']} | {r['attention_us_per_step']} | {r['attention_us_per_sequence_and_layer']}"
            f" | {r['attention_share']:.0%} |"
        )
    lines.append("")
    for precision in args.precisions:
        mine = {r["rows"]: r for r in rows if r["precision"] == precision}
        for few, many in ((4, 16), (16, 64)):
            if few in mine and many in mine:
                a, b = mine[few], mine[many]
                lines.append(
                    f"- {precision}, {few} to {many} sequences per step ({many // few}x the tokens): the weight MatMuls"
                    f" take {b['matmul_us_per_step'] / a['matmul_us_per_step']:.1f}x the time, GroupQueryAttention"
                    f" {b['attention_us_per_step'] / a['attention_us_per_step']:.1f}x."
                )
    lines += [
        "",
        "The profiler adds a few µs to every kernel (about a hundred a step), which inflates the small steps most:"
        " at one sequence per step it more than doubles the step (compare the batcher alone's tokens/s in"
        " `serve.md`). Read the shares and the growth from 4 sequences up.",
    ]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
