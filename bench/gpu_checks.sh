#!/usr/bin/env bash
# The GPU benchmarks in one call, for a GPU host lent for a few minutes:
#   1. bench/serve.py on the torch backend (bf16 on cuda): lmforge serve with and without
#      batching and FastAPI + transformers on the same GPU, plus the batcher alone and
#      whether batching changes greedy tokens there;
#   2. bench/pretrain_throughput.py (GPT-2-small shape, eager and torch.compile) with
#      whatever time is left.
#
#   bash bench/gpu_checks.sh PREPARED OUT [SECONDS]
#
# PREPARED is what `bench/serve.py --prepare-only PREPARED` wrote on a machine with the demo
# store (the host needs no store and no Prefect: torch, transformers, onnxruntime, fastapi,
# uvicorn, pydantic, prometheus_client, tokenizers, safetensors). Results and logs go to OUT;
# SECONDS (default 540) bounds the whole script. A part stopped at its share of it writes what
# it measured (on an H200, 2026-12-04, the serve part stopped during batching off at 64
# clients, about 80 s a run there; `bench/serve.py --servers ...` measures the rest later).
set -uo pipefail
prepared=${1:?PREPARED folder (bench/serve.py --prepare-only)}
out=${2:?OUT folder}
budget=${3:-540}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'onnxruntime', onnxruntime.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"
python3 -c "import flows.cli, model.serving.api, model.torch_lm, bench.serve" || exit 1

echo "== serve ($(left) s left)"
timeout $(($(left) - 150)) python3 bench/serve.py --prepared "$prepared" --backend torch --device cuda \
    --precisions bf16 --out "$out" 2>&1 | tee "$out/serve.log" | grep -v '^{"server"' || echo "serve: rc $?"

echo "== pretrain throughput ($(left) s left)"
timeout $(($(left) - 10)) python3 bench/pretrain_throughput.py --device cuda --sizes gpt2-small --compile \
    --out "$out" 2>&1 | tee "$out/pretrain.log" | tail -12 || echo "pretrain: rc $?"
echo "== done in $(($(date +%s) - start)) s"
