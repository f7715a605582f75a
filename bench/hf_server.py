"""What a user would write by hand to serve the Hugging Face directory: FastAPI + transformers `generate`.

The baseline of ``bench/serve.py``: one ``generate`` call per request (FastAPI runs the
sync endpoint on its thread pool, so concurrent requests run side by side but never share
a forward pass), greedy, no streaming. The prompt starts with the end-of-text id, as
``lmforge serve`` feeds it, so both servers see the same tokens.

    .venv/bin/python bench/hf_server.py --model DIR --port 8001
    python bench/hf_server.py --model DIR --device cuda --dtype bf16     # on a GPU host
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--device", default="cpu", help="where the model runs: cpu, or cuda on a GPU host")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16 is what one would pick on a GPU")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def complete(body: dict) -> dict:
        ids = torch.tensor([[tok.eos_token_id] + tok.encode(body["prompt"])], device=args.device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(body.get("max_tokens", 16)),
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        return {
            "choices": [{"text": tok.decode(new), "index": 0, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": ids.shape[1],
                "completion_tokens": len(new),
                "total_tokens": ids.shape[1] + len(new),
            },
        }

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
