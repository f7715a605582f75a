"""ONNX export contracts: torch == ONNX fp32, INT8 close and fully quantized, ONNX generation == torch, the gate.

One tiny model is trained (a few dozen steps on a repeated sentence, so its loss means
something) and exported once for the whole module; every test reads that export.
"""

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from model.export import (
    INT8_FILE,
    expected_matmul_integer,
    graph_signature,
    op_counts,
    parity,
    release_gate,
    serving_parity,
)
from model.generate import generate
from model.onnx_generate import OnnxGenerator, OnnxLM
from tests.model.tiny import TEXT, export_tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("export"))


def test_graph_keeps_batch_seq_and_past_symbolic(exported):
    _, result, _, _ = exported
    sig = graph_signature(result.dir / "model.onnx")
    assert sig["input_ids"] == ["batch", "seq"]
    for i in range(2):  # one cache tensor per layer, optimum's names
        assert sig[f"past_key_values.{i}.key"] == ["batch", 2, "past", 16] == sig[f"past_key_values.{i}.value"]
        assert all(isinstance(sig[f"present.{i}.value"][a], str) for a in (0, 2))
    assert "past_key_values.2.key" not in sig
    assert sig["past_mask"] == ["batch", "past"]  # rows of one batch may hold different histories
    assert sig["logits"][:2] == ["batch", "seq"]
    meta = json.loads((result.dir / "export.json").read_text())
    assert meta["gpt_config"]["n_layer"] == 2 and meta["files"] == {
        "fp32": "model.onnx",
        "int8": "model.int8.onnx",
        "int4": "model.int4.onnx",
    }
    assert meta["serve_files"] == {"fp32": "serve.onnx", "int8": "serve.int8.onnx"}
    files = {"model.onnx", "model.int8.onnx", "model.int4.onnx", "serve.onnx", "serve.int8.onnx", "tokenizer.json"}
    assert set(meta["bytes"]) == files


def test_the_serving_graph_matches_torch_and_its_int8_quantizes_every_linear(exported):
    """Rows of different lengths prefilled alone, then decoded together in place, one row dropped midway."""
    model, result, _, _ = exported
    assert result.meta["serve_parity_max_abs_diff"] < 1e-4
    assert serving_parity(model, result.dir / "serve.onnx", lengths=(2, 9, 5, 14), steps=5, seed=1) < 1e-4
    counts = op_counts(result.dir / "serve.int8.onnx")
    # Every weight MatMul of model.int8.onnx (the same weights, so the same INT8 scales); attention is GQA.
    assert counts["MatMulInteger"] == expected_matmul_integer(2) and counts["GroupQueryAttention"] == 2
    assert "MatMul" not in counts  # no fp32 matrix product left outside attention
    assert result.meta["bytes"]["serve.int8.onnx"] < result.meta["bytes"]["serve.onnx"] / 2


def test_a_model_whose_heads_gqa_cannot_take_gets_no_serving_graph(tmp_path):
    """onnxruntime's CPU GroupQueryAttention wants head sizes in multiples of 16: such a model is served padded."""
    _, result, _, _ = export_tiny(tmp_path, n_embd=48)
    assert result.meta["serve_files"] == {} and result.meta["serve_parity_max_abs_diff"] is None
    assert not (result.dir / "serve.onnx").exists() and result.verdict.passed


def test_onnx_fp32_matches_torch_on_prefill_and_decode_shapes(exported):
    model, result, _, _ = exported
    shapes = list(product((1, 3), (1, 7), (0, 5)))
    assert parity(model, result.dir / "model.onnx", shapes, threads=1) < 1e-4


def test_int8_quantizes_every_linear_including_the_lm_head(exported):
    _, result, _, _ = exported
    counts = result.meta["int8_op_counts"]
    assert counts["MatMulInteger"] == expected_matmul_integer(2) == 15
    assert counts["MatMul"] == 2 * 2  # only q@k^T and attn@v per block stay fp32 (no weights)
    assert result.meta["bytes"]["model.int8.onnx"] < result.meta["bytes"]["model.onnx"]


def test_int8_is_close_and_its_val_loss_within_a_few_percent(exported):
    model, result, _, _ = exported
    val = result.meta["val"]
    assert abs(val["onnx_fp32"]["loss"] - val["torch"]["loss"]) < 1e-5
    assert val["torch"]["loss"] < 1.5  # the model learned the sentence (uniform would be ln 290 = 5.7)
    assert abs(val["onnx_int8"]["loss"] - val["onnx_fp32"]["loss"]) / val["onnx_fp32"]["loss"] < 0.05
    assert result.verdict.passed, result.verdict.message
    x = np.array([[5, 9, 30, 31, 7]])
    lm = OnnxLM(result.dir / INT8_FILE, threads=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()
    assert np.abs(lm.logits(x) - ref).max() < 0.5
    assert (lm.logits(x).argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_int4_quantizes_every_linear_and_stays_within_its_gate(exported):
    _, result, eot_id, tok = exported
    counts = result.meta["int4_op_counts"]
    assert counts["MatMulNBits"] == expected_matmul_integer(2) and counts["GatherBlockQuantized"] == 1
    assert counts["MatMul"] == 2 * 2
    p = result.meta["precisions"]
    assert p["int4"]["bytes"] < p["int8"]["bytes"] < p["fp32"]["bytes"]
    check = result.verdict.checks["int4_val_loss"]
    assert check["passed"] and check["int4_loss"] == p["int4"]["val_loss"] and check["relative_increase"] < 0.05
    ids = OnnxGenerator(result.dir, precision="int4", threads=1).generate_ids(
        [eot_id] + tok.encode("the cat").ids, 6, temperature=0
    )
    assert 1 <= len(ids) <= 6


def test_onnx_greedy_generation_equals_torch_token_for_token(exported):
    model, result, eot_id, tok = exported
    prompt = [eot_id] + tok.encode("the cat").ids
    want = generate(model, prompt, 40, temperature=0, eot_id=eot_id)
    assert len(want) == 32 - len(prompt) + 1  # stopped when the context window was full
    assert OnnxGenerator(result.dir, precision="fp32", threads=1).generate_ids(prompt, 40, temperature=0) == want
    sampled = generate(model, prompt, 40, temperature=1.0, top_k=20, top_p=0.9, eot_id=eot_id, seed=3)
    assert (
        OnnxGenerator(result.dir, precision="fp32", threads=1).generate_ids(
            prompt, 40, temperature=1.0, top_k=20, top_p=0.9, seed=3
        )
        == sampled
    )


def test_gate_fails_with_a_message_naming_the_check(exported):
    _, result, _, _ = exported
    diff = result.meta["parity_max_abs_diff"]
    fp32, int8 = result.meta["val"]["onnx_fp32"]["loss"], result.meta["val"]["onnx_int8"]["loss"]
    strict = release_gate(diff, fp32, int8, max_logit_diff=1e-12)
    assert not strict.passed and "ONNX fp32 differs from torch" in strict.message and "INT8" not in strict.message
    assert not strict.checks["onnx_parity"]["passed"] and strict.checks["int8_val_loss"]["passed"]
    worse = release_gate(1e-6, 2.00, 2.10)
    assert not worse.passed and "INT8 val loss 2.1000 is +5.00%" in worse.message
    assert release_gate(1e-6, 2.00, 2.03).passed
    int4 = release_gate(1e-6, 2.00, 2.01, int4_loss=2.2, max_int4_loss_increase=0.05)
    assert not int4.passed and "INT4 val loss 2.2000 is +10.00%" in int4.message and "INT8" not in int4.message
    assert release_gate(1e-6, 2.00, 2.01, int4_loss=2.05).passed


def test_onnx_generate_runs_without_torch(exported):
    _, result, _, _ = exported
    script = (
        "import json, sys\n"
        "from model.onnx_generate import OnnxGenerator\n"
        f"g = OnnxGenerator({str(result.dir)!r}, threads=1)\n"
        "text = g.generate('the cat', max_new_tokens=30, temperature=0)\n"
        "print(json.dumps({'text': text, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["text"] == OnnxGenerator(result.dir, threads=1).generate("the cat", max_new_tokens=30, temperature=0)
    assert len(out["text"]) > 20 and ("the cat" + out["text"])[:40] in TEXT * 3


def test_generator_names_a_missing_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported lmforge model"):
        OnnxGenerator(tmp_path)
