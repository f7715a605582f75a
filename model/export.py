"""ONNX export with a KV cache, onnxruntime INT8 quantization, parity checks and the release gate.

Design decisions:
- The graph is ``forward_cached``: inputs ``input_ids (batch, seq)``, ``past_mask (batch,
  past)`` (1 = a real cached token, 0 = left padding: rows of one batch may hold different
  histories, which is what continuous batching needs) and one ``past_key_values.{i}.key`` /
  ``.value (batch, H, past, hd)`` per layer; outputs ``logits (batch, seq, V)`` and
  ``present.{i}.key`` / ``.value (batch, H, past + seq, hd)``: the names and layout of
  optimum's decoder-with-past exports. One cache tensor per layer, not one stacked
  ``(L, ...)`` tensor: slicing and restacking it copied the whole cache twice a step (about
  30% of a 16-sequence decode step on the demo model). One graph serves prefill
  (past = 0) and decoding (seq = 1); RoPE angles are computed in-graph from past.
- torch 2.13's dynamo exporter with ``torch.export.Dim`` for batch, seq and past. SDPA
  under dynamic dims has been known to specialise shapes silently (pytorch#152018), so
  :func:`export_onnx` reads the saved graph back and fails if any of them became a number.
  Example inputs use sizes >= 2: torch.export specialises dimensions that are 0 or 1.
- The LM head is untied (its weight cloned) in the exported copy: a tied head reaches its
  MatMul through a Transpose of the embedding and stays fp32 after ``quantize_dynamic``.
  :func:`quantize_int8` returns op counts so callers can check ``MatMulInteger == 7L + 1``.
- INT8 is onnxruntime dynamic quantization (QInt8 weights, activations quantized at run
  time): no calibration data, and measured +0.04% val loss on a small GPT. The release gate
  still checks it on held-out documents, scored by :mod:`model.evaluate`'s code path.
- INT4 is onnxruntime's weight-only 4-bit quantization of every weight MatMul
  (``MatMulNBits``) and of the token embedding (``GatherBlockQuantized``), symmetric, in
  blocks of 32 with an fp32 scale each (activations stay fp32): about 5 bits a weight
  against INT8's 8, for a larger loss, which the gate bounds separately (5% by default).
  It needs no calibration either.
- Beside them, the **serving graph** (:mod:`model.serving_graph`, ``serve.onnx`` and its
  INT8 ``serve.int8.onnx``): the same weights as onnxruntime's fused ops with the KV cache
  updated in place, what ``lmforge serve`` batches. It is checked against torch like
  ``model.onnx`` (:func:`serving_parity`, in the gate's parity figure). Models whose head
  size onnxruntime's ``GroupQueryAttention`` cannot take get none and serve ``model*.onnx``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from model.evaluate import EvalDoc, evaluate_documents, evaluate_logits_fn
from model.onnx_generate import EXPORT_FILE, TOKENIZER_FILE, OnnxLM, ServingGraph, cache_names
from model.serving_graph import SERVE_INT8_FILE, save_serving_graph
from model.serving_graph import unsupported as serving_graph_unsupported

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT4_FILE = "model.int4.onnx"
log = logging.getLogger("lmforge.export")
PARITY_SHAPES = ((1, 1, 0), (1, 7, 0), (3, 7, 5), (3, 1, 5), (2, 4, 9))
"""(batch, seq, past) cases of :func:`parity`: prefill, batched prefill after a cache, T=1 decode."""
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB; larger models keep weights in a side file


class _CachedStep(torch.nn.Module):
    """``forward_cached`` as ``forward`` over flat per-layer caches (k0, v0, k1, v1, ...), as the exporter traces it."""

    def __init__(self, gpt: torch.nn.Module):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, past_mask, *past):
        logits, ks, vs = self.gpt.forward_cached(input_ids, past[0::2], past[1::2], past_mask)
        return (logits, *(t for kv in zip(ks, vs) for t in kv))


def graph_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in the order :class:`_CachedStep` takes and returns them."""
    return ["input_ids", "past_mask", *cache_names(n_layer, "past")], ["logits", *cache_names(n_layer, "present")]


def _symbolic_axes(n_layer: int) -> dict[str, tuple[int, int]]:
    """Axes that must stay symbolic in the saved graph: batch and seq/past of every tensor."""
    cache = {n: (0, 2) for n in cache_names(n_layer, "past") + cache_names(n_layer, "present")}
    return {"input_ids": (0, 1), "past_mask": (0, 1), "logits": (0, 1), **cache}


def _cpu_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).float().cpu().eval()


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def graph_signature(path: str | Path) -> dict[str, list]:
    """Name -> shape (ints, or strings for symbolic dims) of every graph input and output."""
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: _dims(v) for v in list(g.input) + list(g.output)}


def _opset(path: Path) -> int:
    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(o.version for o in imports if o.domain in ("", "ai.onnx"))


def op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the graph holds (e.g. ``MatMulInteger`` after INT8)."""
    g = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in g.node).items()))


def export_onnx(
    model: torch.nn.Module, out_dir: str | Path, opset: int | None = None, file_name: str = FP32_FILE
) -> Path:
    """Export ``model.forward_cached`` (fp32, CPU, LM head untied) to ``out_dir/file_name``.

    ``opset=None`` takes the exporter's default (20 on torch 2.13). Raises RuntimeError
    if batch, seq or past did not stay symbolic in the saved graph.
    """
    cfg = model.config
    if cfg.block_size < 3:
        raise ValueError(f"export needs block_size >= 3 to trace with non-specialised sizes, got {cfg.block_size}")
    gpt = _cpu_fp32_copy(model)
    gpt.lm_head.weight = torch.nn.Parameter(gpt.lm_head.weight.detach().clone())
    out = Path(out_dir) / file_name
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=cfg.block_size)
    past = torch.export.Dim("past", min=0, max=cfg.block_size - 1)
    cache = {0: batch, 2: past}
    ids = torch.zeros((2, 2), dtype=torch.long)
    past_kv = [torch.zeros(2, cfg.n_head, 2, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    past_mask = torch.ones((2, 2), dtype=torch.long)
    input_names, output_names = graph_names(cfg.n_layer)
    external = sum(p.numel() * 4 for p in gpt.parameters()) > _EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            _CachedStep(gpt).eval(),
            (ids, past_mask, *past_kv),
            str(out),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: past}, tuple(cache for _ in past_kv)),
            opset_version=opset,
            external_data=external,
            dynamo=True,
            verbose=False,
        )
    sig = graph_signature(out)
    fixed = {
        n: [sig[n][a] for a in axes]
        for n, axes in _symbolic_axes(cfg.n_layer).items()
        if any(not isinstance(sig[n][a], str) for a in axes)
    }
    if fixed:
        raise RuntimeError(
            f"ONNX export specialised dynamic axes to fixed sizes {fixed} (see pytorch#152018); "
            "the graph would only run at those shapes"
        )
    return out


def quantize_int8(fp32_path: str | Path, out_path: str | Path) -> dict[str, int]:
    """Dynamic INT8 (QInt8 weights) of an exported graph; returns the INT8 graph's op counts."""
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    external = fp32_path.stat().st_size > _EXTERNAL_DATA_BYTES or fp32_path.with_name(fp32_path.name + ".data").exists()
    with _quiet(""):  # onnxruntime's advice to pre-process goes to the root logger on every call
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
            # The serving graph's contrib ops (SimplifiedLayerNormalization, GroupQueryAttention)
            # have no ONNX shape inference: their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return op_counts(out_path)


def quantize_int4(fp32_path: str | Path, out_path: str | Path, block_size: int = 32) -> dict[str, int]:
    """Weight-only INT4 of an exported graph, every weight MatMul (``MatMulNBits``) and the token
    embedding (``GatherBlockQuantized``, blocks along the embedding dimension); returns its op counts."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    external = fp32_path.stat().st_size > _EXTERNAL_DATA_BYTES or fp32_path.with_name(fp32_path.name + ".data").exists()
    with _quiet(""), _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer = MatMulNBitsQuantizer(
            str(fp32_path),
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path), use_external_data_format=external)
    return op_counts(out_path)


@contextmanager
def _quiet(logger_name: str):
    """Raise a logger to ERROR for a block: the exporters' notices (missing torchvision ops,
    pre-processing advice) are not problems of this export and would bury the real log."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def expected_matmul_integer(n_layer: int) -> int:
    """INT8 MatMuls of a fully quantized export: q, k, v, o, gate, up, down per block, plus the LM head."""
    return 7 * n_layer + 1


@torch.no_grad()
def parity(
    model: torch.nn.Module,
    onnx_path: str | Path,
    shapes: Sequence[tuple[int, int, int]] = PARITY_SHAPES,
    seed: int = 0,
    threads: int | None = None,
) -> float:
    """Max |torch - onnxruntime| over logits and present caches, on random ids at each (batch, seq, past).

    The past caches are real: torch's own cache of a random prefix of length ``past``.
    """
    gpt = _cpu_fp32_copy(model)
    lm = OnnxLM(onnx_path, threads)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, t, p in shapes:
        prefix = torch.randint(0, gpt.config.vocab_size, (b, p), generator=g)
        ids = torch.randint(0, gpt.config.vocab_size, (b, t), generator=g)
        pk, pv = gpt.empty_cache(b)
        if p:
            _, pk, pv = gpt.forward_cached(prefix, pk, pv)
        ref = gpt.forward_cached(ids, pk, pv)
        got = lm(ids.numpy(), [t.numpy() for t in pk], [t.numpy() for t in pv])
        pairs = [(got[0], ref[0]), *zip(got[1] + got[2], ref[1] + ref[2])]
        worst = max(worst, *(float(np.abs(o - r.numpy()).max()) for o, r in pairs))
    return worst


@torch.no_grad()
def serving_parity(
    model: torch.nn.Module, serve_path: str | Path, lengths=(7, 3, 12), steps: int = 3, seed: int = 0
) -> float:
    """Max |torch - serving graph| over last-position logits, rows of different lengths batched in place.

    Each row is prefilled alone, then all decode ``steps`` tokens together; the last row
    is dropped once (its slot refilled) so the in-place bookkeeping is checked too.
    """
    gpt = _cpu_fp32_copy(model)
    cache = ServingGraph(serve_path).cache(len(lengths))
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, gpt.config.vocab_size, (n,), generator=g).tolist() for n in lengths]

    def ref(seq: list[int]) -> np.ndarray:
        return gpt(torch.tensor([seq]))[0][0, -1].numpy()

    worst = max(float(np.abs(cache.add(s) - ref(s)).max()) for s in seqs)
    for step in range(steps):
        if step == 1:
            seqs = [seqs[i] for i in cache.drop([0])]
        nxt = torch.randint(0, gpt.config.vocab_size, (len(seqs),), generator=g).tolist()
        got = cache.decode(np.asarray(nxt, dtype=np.int64)[:, None])
        for row, (seq, token) in enumerate(zip(seqs, nxt)):
            seq.append(token)
            worst = max(worst, float(np.abs(got[row] - ref(seq)).max()))
    return worst


def onnx_val_loss(
    onnx_path: str | Path,
    docs: Sequence[EvalDoc],
    eot_id: int,
    block_size: int,
    batch_size: int = 8,
    threads: int | None = None,
) -> dict:
    """:func:`model.evaluate.evaluate_documents` for an exported graph (fp32 or INT8)."""
    return evaluate_logits_fn(OnnxLM(onnx_path, threads).logits, docs, eot_id, block_size, batch_size)


@dataclass(frozen=True)
class GateVerdict:
    """Whether an export may ship, each check's numbers, and a message that says what failed."""

    passed: bool
    message: str
    checks: dict = field(default_factory=dict)


def release_gate(
    max_abs_diff: float,
    fp32_loss: float,
    int8_loss: float,
    max_logit_diff: float = 1e-3,
    max_int8_loss_increase: float = 0.02,
    int4_loss: float | None = None,
    max_int4_loss_increase: float = 0.05,
) -> GateVerdict:
    """Fail when ONNX fp32 logits drift from torch, or INT8 (or INT4) loses too much val loss against fp32.

    The increases are relative: 0.02 allows INT8 loss up to 2% above fp32. ``int4_loss``
    None: no INT4 model was made, and there is nothing of it to check.
    """
    if fp32_loss <= 0:
        raise ValueError(f"fp32_loss must be positive (a cross-entropy), got {fp32_loss}")
    increase = (int8_loss - fp32_loss) / fp32_loss
    checks = {
        "onnx_parity": {
            "passed": bool(max_abs_diff <= max_logit_diff),
            "max_abs_diff": max_abs_diff,
            "limit": max_logit_diff,
        },
        "int8_val_loss": {
            "passed": bool(increase <= max_int8_loss_increase),
            "fp32_loss": fp32_loss,
            "int8_loss": int8_loss,
            "relative_increase": increase,
            "limit": max_int8_loss_increase,
        },
    }
    if int4_loss is not None:
        increase4 = (int4_loss - fp32_loss) / fp32_loss
        checks["int4_val_loss"] = {
            "passed": bool(increase4 <= max_int4_loss_increase),
            "fp32_loss": fp32_loss,
            "int4_loss": int4_loss,
            "relative_increase": increase4,
            "limit": max_int4_loss_increase,
        }
    failed = []
    if not checks["onnx_parity"]["passed"]:
        failed.append(
            f"ONNX fp32 differs from torch by {max_abs_diff:.3g} (max |logit diff|), above the limit {max_logit_diff:.3g}"
        )
    if not checks["int8_val_loss"]["passed"]:
        failed.append(
            f"INT8 val loss {int8_loss:.4f} is {increase:+.2%} against fp32 {fp32_loss:.4f}, above the limit {max_int8_loss_increase:+.2%}"
        )
    int4 = checks.get("int4_val_loss")
    if int4 is not None and not int4["passed"]:
        failed.append(
            f"INT4 val loss {int4_loss:.4f} is {int4['relative_increase']:+.2%} against fp32 {fp32_loss:.4f}, above the limit {max_int4_loss_increase:+.2%}"
        )
    if failed:
        return GateVerdict(False, "release gate failed: " + "; ".join(failed), checks)
    also = (
        f", INT4 val loss {int4['relative_increase']:+.2%} <= {max_int4_loss_increase:+.2%}" if int4 is not None else ""
    )
    return GateVerdict(
        True,
        f"release gate passed: parity {max_abs_diff:.3g} <= {max_logit_diff:.3g}, INT8 val loss {increase:+.2%} <= {max_int8_loss_increase:+.2%}{also}",
        checks,
    )


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and measured; ``meta`` is the content of export.json."""

    dir: Path
    verdict: GateVerdict
    meta: dict


def export_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    eot_id: int,
    val_docs: Sequence[EvalDoc],
    tokenizer_file: str | Path | None = None,
    batch_size: int = 8,
    max_logit_diff: float = 1e-3,
    max_int8_loss_increase: float = 0.02,
    int4: bool = True,
    max_int4_loss_increase: float = 0.05,
    opset: int | None = None,
    threads: int | None = None,
) -> ExportResult:
    """Export fp32, INT8 (and INT4), check parity and held-out loss, gate, and write ``export.json``.

    The directory is what :class:`model.onnx_generate.OnnxGenerator` loads. The verdict
    is returned, not raised: the caller decides what a failed gate stops.
    """
    out = Path(out_dir)
    cfg = model.config
    fp32 = export_onnx(model, out, opset)
    counts = quantize_int8(fp32, out / INT8_FILE)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    onnx_diff = parity(model, fp32, threads=threads)
    serve_files, serve_diff, why_not = {}, None, serving_graph_unsupported(cfg.to_dict())
    if why_not is None:
        serve_files = {
            "fp32": save_serving_graph(_state_arrays(model), cfg.to_dict(), out).name,
            "int8": SERVE_INT8_FILE,
        }
        quantize_int8(out / serve_files["fp32"], out / SERVE_INT8_FILE)
        serve_diff = serving_parity(model, out / serve_files["fp32"])
    else:
        log.info("no serving graph (lmforge serve batches model.onnx instead): %s", why_not)
    diff = max(onnx_diff, serve_diff or 0.0)
    torch_eval = evaluate_documents(model, val_docs, eot_id, cfg.block_size, batch_size)
    fp32_eval = onnx_val_loss(fp32, val_docs, eot_id, cfg.block_size, batch_size, threads)
    int8_eval = onnx_val_loss(out / INT8_FILE, val_docs, eot_id, cfg.block_size, batch_size, threads)
    files = {"fp32": FP32_FILE, "int8": INT8_FILE}
    val = {"torch": torch_eval, "onnx_fp32": fp32_eval, "onnx_int8": int8_eval}
    int4_counts = None
    if int4:
        int4_counts = quantize_int4(fp32, out / INT4_FILE)
        val["onnx_int4"] = onnx_val_loss(out / INT4_FILE, val_docs, eot_id, cfg.block_size, batch_size, threads)
        files["int4"] = INT4_FILE
    verdict = release_gate(
        diff,
        fp32_eval["loss"],
        int8_eval["loss"],
        max_logit_diff,
        max_int8_loss_increase,
        val["onnx_int4"]["loss"] if int4 else None,
        max_int4_loss_increase,
    )
    sizes = {name: _model_bytes(out / f) for name, f in files.items()}
    sig = graph_signature(fp32)
    input_names, output_names = graph_names(cfg.n_layer)
    meta = {
        "gpt_config": cfg.to_dict(),
        "lm_head_untied": True,
        "eot_id": eot_id,
        "opset": _opset(fp32),
        "files": files,
        "serve_files": serve_files,
        "precisions": {
            name: {
                "bytes": sizes[name],
                "val_loss": val[f"onnx_{name}"]["loss"],
                "bits_per_byte": val[f"onnx_{name}"].get("bits_per_byte"),
            }
            for name in files
        },
        "bytes": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != EXPORT_FILE},
        "inputs": {n: sig[n] for n in input_names},
        "outputs": {n: sig[n] for n in output_names},
        "int8_op_counts": counts,
        "int8_matmul_integer_expected": expected_matmul_integer(cfg.n_layer),
        "int4_op_counts": int4_counts,
        "parity_max_abs_diff": onnx_diff,
        "serve_parity_max_abs_diff": serve_diff,
        "val": val,
        "gate": {"passed": verdict.passed, "message": verdict.message, "checks": verdict.checks},
    }
    (out / EXPORT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return ExportResult(out, verdict, meta)


def _state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as fp32 numpy arrays, by their state-dict names (what the serving graph is built from)."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _model_bytes(path: Path) -> int:
    """A graph's size on disk, with its external weights file when it has one."""
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)
