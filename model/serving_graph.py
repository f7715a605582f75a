"""The serving graph: the decoder written as onnxruntime's fused ops, its KV cache updated in place.

The exported ``model.onnx`` (see :mod:`model.export`) is ``forward_cached`` as torch
traces it: every step takes the past cache and returns a new one, ``present = concat(past,
new)``, so a decode step copies the whole cache of every row, and rows of one batch are
left-padded to the longest. On the demo model at 16 rows that copy is about as costly as
the matmuls. Serving wants what onnxruntime-genai does instead: one fixed buffer per layer
``(rows, H, block_size, hd)`` that ``GroupQueryAttention`` (com.microsoft) reads and writes
**in place** (past and present bound to the same memory), each row with its own length
(``seqlens_k``), RoPE applied inside the op at each row's own positions. Nothing is
padded and nothing is copied per step.

Built here from the model's weights with ``onnx.helper`` (no torch, no tracing): inputs
``input_ids (batch, seq)``, ``seqlens_k (batch,) int32`` (each row's length after this step,
minus one), ``total_sequence_length () int32`` (the longest of them), and
``past_key_values.{i}.key/.value (batch, H, block_size, hd)``; outputs ``logits (batch, V)``
of each row's last position only (all a generator needs; the full-sequence logits of the
evaluation path stay in ``model.onnx``), and ``present.{i}.key/.value`` (the same buffers).
A call either prefills one row (``seq`` = its prompt) or decodes every row (``seq`` = 1).

Its logits equal :class:`model.gpt.GPT`'s within float error (tested, and checked at
export). INT8 is the same ``quantize_dynamic`` as ``model.int8.onnx``'s, and every Linear
stays its own MatMul (q, k and v are not fused into one, nor gate and up), so each weight
gets the same INT8 scale as in the graph the release gate scored: fusing them was about 5%
faster on the demo model, but would serve weights quantized differently from the gated ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model.onnx_generate import cache_names

SERVE_FP32_FILE = "serve.onnx"
SERVE_INT8_FILE = "serve.int8.onnx"
OPSET = 17


def unsupported(config: Mapping) -> str | None:
    """Why a GPT of ``config`` cannot have a serving graph (onnxruntime's CPU ``GroupQueryAttention``
    takes head sizes that are multiples of 16), or None when it can."""
    head_dim = config["n_embd"] // config["n_head"]
    return f"head size {head_dim} is not a multiple of 16" if head_dim % 16 else None


def rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (block_size, head_dim/2) of :func:`model.gpt.rope_angles`, in float32 as torch computes them."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    freqs = np.arange(block_size, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def build_serving_graph(weights: Mapping[str, np.ndarray], config: Mapping) -> onnx.ModelProto:
    """The serving graph of a GPT with ``config`` (``GPTConfig`` fields) and its state dict as numpy arrays.

    ``weights`` uses :class:`model.gpt.GPT`'s names (``blocks.{i}.attn.q_proj.weight``, ...);
    torch's ``Linear`` stores ``(out, in)``, the graph multiplies by ``(in, out)``.
    """
    d, heads, layers = config["n_embd"], config["n_head"], config["n_layer"]
    hd, eps, block = d // heads, float(config["norm_eps"]), config["block_size"]
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def linear(x: str, name: str, out: str) -> str:
        """x @ W.T: torch's Linear stores (out, in)."""
        w = np.asarray(weights[name], dtype=np.float32).T
        nodes.append(helper.make_node("MatMul", [x, const(out + ".weight", w)], [out], name=out))
        return out

    def rms(x: str, weight: str, out: str) -> str:
        w = const(out + ".weight", np.asarray(weights[weight], dtype=np.float32))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, w], [out], name=out, axis=-1, epsilon=eps))
        return out

    cos, sin = rope_tables(block, hd, float(config["rope_theta"]))
    const("cos_cache", cos)
    const("sin_cache", sin)
    emb = np.asarray(weights["tok_emb.weight"], dtype=np.float32)
    nodes.append(helper.make_node("Gather", [const("tok_emb.weight", emb), "input_ids"], ["h0"], name="embed"))
    past, present = cache_names(layers, "past"), cache_names(layers, "present")
    x = "h0"
    for i in range(layers):
        p = f"blocks.{i}"
        h = rms(x, f"{p}.attn_norm.weight", f"{p}.attn_norm")
        q, k, v = (linear(h, f"{p}.attn.{n}_proj.weight", out=f"{p}.attn.{n}") for n in "qkv")
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    past[2 * i],
                    past[2 * i + 1],
                    "seqlens_k",
                    "total_sequence_length",
                    "cos_cache",
                    "sin_cache",
                ],
                [f"{p}.attn.out", present[2 * i], present[2 * i + 1]],
                name=f"{p}.attn",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=heads,
                do_rotary=1,
                rotary_interleaved=1,
            )
        )
        o = linear(f"{p}.attn.out", f"{p}.attn.o_proj.weight", out=f"{p}.attn.o")
        nodes.append(helper.make_node("Add", [x, o], [f"{p}.resid1"], name=f"{p}.resid1"))
        x = f"{p}.resid1"
        h = rms(x, f"{p}.mlp_norm.weight", f"{p}.mlp_norm")
        hidden = [linear(h, f"{p}.mlp.{n}_proj.weight", out=f"{p}.mlp.{n}") for n in ("gate", "up")]
        nodes.append(helper.make_node("Sigmoid", [hidden[0]], [f"{p}.mlp.sig"], name=f"{p}.mlp.sig"))
        nodes.append(helper.make_node("Mul", [hidden[0], f"{p}.mlp.sig"], [f"{p}.mlp.silu"], name=f"{p}.mlp.silu"))
        nodes.append(helper.make_node("Mul", [f"{p}.mlp.silu", hidden[1]], [f"{p}.mlp.act"], name=f"{p}.mlp.act"))
        down = linear(f"{p}.mlp.act", f"{p}.mlp.down_proj.weight", out=f"{p}.mlp.down")
        nodes.append(helper.make_node("Add", [x, down], [f"{p}.resid2"], name=f"{p}.resid2"))
        x = f"{p}.resid2"
    # Only each row's last position goes through the head: a prefill of n tokens needs one row of logits.
    one = const("one", np.array([1], dtype=np.int64))
    ends = const("end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    nodes.append(
        helper.make_node(
            "Slice", [x, const("minus_one", np.array([-1], dtype=np.int64)), ends, one], ["h_last"], name="last"
        )
    )
    head = np.asarray(weights.get("lm_head.weight", emb), dtype=np.float32)
    nodes.append(
        helper.make_node(
            "MatMul",
            [rms("h_last", "norm.weight", "norm"), const("lm_head.weight", head.T)],
            ["logits_3d"],
            name="lm_head",
        )
    )
    nodes.append(helper.make_node("Squeeze", ["logits_3d", one], ["logits"], name="logits"))

    cache_shape = ["batch", heads, block, hd]
    graph = helper.make_graph(
        nodes,
        "lmforge-serve",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            *(helper.make_tensor_value_info(n, TensorProto.FLOAT, cache_shape) for n in past),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config["vocab_size"]]),
            *(helper.make_tensor_value_info(n, TensorProto.FLOAT, cache_shape) for n in present),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def save_serving_graph(weights: Mapping[str, np.ndarray], config: Mapping, out_dir: str | Path) -> Path:
    """Write :func:`build_serving_graph`'s fp32 graph to ``out_dir/serve.onnx`` (weights past 1 GiB
    in a side ``serve.onnx.data``: protobuf caps a file at 2 GiB). INT8 is :func:`model.export.quantize_int8` of it."""
    path = Path(out_dir) / SERVE_FP32_FILE
    model = build_serving_graph(weights, config)
    external = sum(t.ByteSize() for t in model.graph.initializer) > 1 << 30
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data")
    return path
