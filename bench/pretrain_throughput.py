"""Pretraining throughput and MFU: lmforge's Trainer vs Hugging Face Llama, same shapes, same process.

What a user would otherwise pick for a small Llama-style model is ``transformers``'
``LlamaForCausalLM`` with a plain AdamW loop. Both run here on the same random token
stream, the same batch geometry, the same optimizer settings and the same precision
(bf16 autocast on GPU, fp32 on CPU); the numbers are steady-state medians over timed
windows after warmup. MFU uses model.flops (6N + 12·L·H·Q·T per token, dense bf16 peak of
the device).

    python bench/pretrain_throughput.py --device cuda --sizes tiny gpt2-small --compile
    python bench/pretrain_throughput.py --device cpu --sizes tiny --steps 12

Writes ``bench/results/pretrain_throughput-<device>.json`` and ``.md`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine as host  # noqa: E402
from model.config import (
    GPTConfig,  # noqa: E402
    TrainConfig,  # noqa: E402
)
from model.data import TokenWindows  # noqa: E402
from model.flops import estimate_mfu, flops_per_token, matmul_params, peak_flops  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.optim import configure_optimizer  # noqa: E402
from model.trainer import Trainer  # noqa: E402

SIZES = {
    # 5.3M parameters: 4 x 256, vocabulary 8192
    "tiny": dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256, micro_batch=128),
    # GPT-2-small-sized Llama: 12 x 768, 1024 context
    "gpt2-small": dict(vocab_size=32768, block_size=1024, n_layer=12, n_head=12, n_embd=768, micro_batch=32),
}


def machine() -> dict:
    info = {**host.machine(), "torch": torch.__version__, "cpus": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed_steps(step_fn, steps: int, warmup: int, window: int, sync) -> list[float]:
    """Seconds per step, as medians of windows of ``window`` steps after ``warmup`` steps."""
    for _ in range(warmup):
        step_fn()
    sync()
    per_step = []
    for _ in range(max(1, steps // window)):
        t0 = time.perf_counter()
        for _ in range(window):
            step_fn()
        sync()
        per_step.append((time.perf_counter() - t0) / window)
    return per_step


def bench_lmforge(cfg: GPTConfig, micro_batch: int, data: TokenWindows, device: str, args, compile: bool) -> dict:
    torch.manual_seed(0)
    tc = TrainConfig(
        max_steps=10**6,
        micro_batch_size=micro_batch,
        block_size=cfg.block_size,
        warmup_steps=0,
        eval_every=0,
        ckpt_every=0,
        log_every=10**6,
        precision="auto",
        compile=compile,
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(GPT(cfg), tc, data, None, out, device, log=lambda _l: None)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        secs = timed_steps(trainer.train_step, args.steps, args.warmup, args.window, sync)
        return {"seconds_per_step": statistics.median(secs), "windows": secs, "params": matmul_params(trainer.model)}


def bench_hf_llama(cfg: GPTConfig, micro_batch: int, data: TokenWindows, device: str, args, compile: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.hidden,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            attn_implementation="sdpa",
        )
    ).to(device)
    hf.config.use_cache = False
    opt = configure_optimizer(hf, 6e-4, 0.1, (0.9, 0.95), device)
    forward = torch.compile(hf) if compile else hf
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    state = {"step": 0}

    def step():
        x, y = data.batch(state["step"], 0, 0, 1, micro_batch, cfg.block_size)
        x, y = x.to(device), y.to(device)
        with amp:
            logits = forward(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    secs = timed_steps(step, args.steps, args.warmup, args.window, sync)
    return {"seconds_per_step": statistics.median(secs), "windows": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=["tiny"], choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--window", type=int, default=10, help="steps per timed window (the median is over windows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd variants of both")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "device": args.device, "args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            s = dict(SIZES[name])
            gpu_micro = s.pop("micro_batch")
            micro = gpu_micro if args.device == "cuda" else 4
            cfg = GPTConfig(**s)
            path = Path(tmp) / f"{name}.bin"
            rng = np.random.default_rng(0)
            rng.integers(
                0, cfg.vocab_size, size=4_000_000, dtype=np.uint16 if cfg.vocab_size <= 65536 else np.uint32
            ).tofile(path)
            data = TokenWindows(
                [(path, "uint16" if cfg.vocab_size <= 65536 else "uint32")], seed=0, vocab_size=cfg.vocab_size
            )
            tokens_per_step = micro * cfg.block_size
            peak = peak_flops(torch.cuda.get_device_name(0)) if args.device == "cuda" else None
            row = {
                "size": name,
                "config": json.loads(cfg.to_json()),
                "micro_batch": micro,
                "tokens_per_step": tokens_per_step,
            }
            variants = [("lmforge", bench_lmforge, False), ("hf_llama", bench_hf_llama, False)]
            if args.compile:
                variants += [("lmforge_compiled", bench_lmforge, True), ("hf_llama_compiled", bench_hf_llama, True)]
            for impl, fn, compiled in variants:
                r = fn(cfg, micro, data, args.device, args, compiled)
                r["tokens_per_s"] = tokens_per_step / r["seconds_per_step"]
                if impl == "lmforge":
                    row["flops_per_token"] = flops_per_token(cfg, cfg.block_size, r["params"])
                if peak:
                    r["mfu"] = estimate_mfu(r["tokens_per_s"], row["flops_per_token"], peak)
                row[impl] = r
                print(
                    f"{name:>10} {impl:>9}: {r['tokens_per_s']:>12,.0f} tok/s"
                    + (f"  MFU {r['mfu']:.1%}" if peak else ""),
                    flush=True,
                )
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            row["speedup_vs_hf"] = row["lmforge"]["tokens_per_s"] / row["hf_llama"]["tokens_per_s"]
            if args.compile:
                row["compiled_speedup_vs_hf"] = (
                    row["lmforge_compiled"]["tokens_per_s"] / row["hf_llama_compiled"]["tokens_per_s"]
                )
            results["runs"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pretrain_throughput-{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Pretraining throughput ({args.device})",
        "",
        f"Machine: {json.dumps(results['machine'])}",
        "",
        "Medians of timed windows after warmup; same random tokens, batch, AdamW and precision for both.",
        "",
        "| size | variant | tokens/step | lmforge tok/s | HF Llama tok/s | lmforge / HF | lmforge MFU | HF MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        for suffix in ("", "_compiled"):
            ours, theirs = r.get("lmforge" + suffix), r.get("hf_llama" + suffix)
            if ours is None:
                continue

            def mfu(x):
                return f"{x['mfu']:.1%}" if "mfu" in x else "-"

            lines.append(
                f"| {r['size']} | {'torch.compile' if suffix else 'eager'} | {r['tokens_per_step']:,} | {ours['tokens_per_s']:,.0f} | "
                f"{theirs['tokens_per_s']:,.0f} | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {mfu(ours)} | {mfu(theirs)} |"
            )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
