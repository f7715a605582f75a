"""What a user would write by hand to serve the Hugging Face directory: FastAPI + transformers `generate`.

The baseline of ``bench/serve.py``: one ``generate`` call per request (FastAPI runs the
sync endpoint on its thread pool, so concurrent requests run side by side but never share
a forward pass), greedy, no streaming. The prompt starts with the end-of-text id, as
``lmforge serve`` feeds it, so both servers see the same tokens.

    .venv/bin/python bench/hf_server.py --model DIR --port 8001
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def complete(body: dict) -> dict:
        ids = torch.tensor([[tok.eos_token_id] + tok.encode(body["prompt"])])
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
