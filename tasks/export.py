"""Stage 11, export: ONNX with an explicit KV cache, onnxruntime INT8, and the release gate.

The finetuned (merged) model is exported with dynamic batch, sequence and past length,
its LM head untied so dynamic quantization covers it, then quantized to INT8. The gate
compares ONNX fp32 logits to torch and INT8 validation loss to fp32 on held-out
documents; a failed gate fails the stage and publishes nothing, so no flow ships a
model that does not match what was evaluated.
"""

from __future__ import annotations

from pydantic import Field

from storage.artifact import Manifest, Store
from tasks.modeling.subsets import eval_docs, select
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError

STAGE = Stage("export", __name__)


class ExportConfig(StageConfig):
    """Release gate tolerances and the held-out documents it scores."""

    max_logit_diff: float = Field(1e-3, gt=0, description="Largest allowed |ONNX fp32 logit - torch logit|.")
    max_int8_loss_increase: float = Field(
        0.02, ge=0, description="Largest allowed relative increase of INT8 validation loss over fp32 (0.02 = 2%)."
    )
    gate_docs_per_language: int = Field(50, ge=1, description="Validation documents per language scored by the gate.")
    batch_size: int = Field(8, ge=1, description="Windows per onnxruntime call when scoring.")
    opset: int | None = Field(None, ge=17, description="ONNX opset; empty: the exporter's default.")


def run(store: Store, cfg: ExportConfig, model: Manifest, shards: Manifest, tokenizer: Manifest) -> Manifest:
    b = STAGE.begin(store, cfg, model=model, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    from model.checkpoint import load_model
    from model.export import export_model

    docs = eval_docs(select(store, STAGE.name, shards, None, "val"), shards.meta["dtype"], cfg.gate_docs_per_language)
    gpt = load_model(model.dir).eval()
    # Export and score inside the writer's temporary directory, which lives in the store (a
    # rename never crosses file systems); a failed gate raises inside it, so nothing is published.
    with STAGE.writer(store, b) as w:
        result = export_model(
            gpt,
            w.dir,
            eot_id=int(shards.meta["eot_id"]),
            val_docs=docs,
            tokenizer_file=tokenizer.path("tokenizer.json"),
            batch_size=cfg.batch_size,
            max_logit_diff=cfg.max_logit_diff,
            max_int8_loss_increase=cfg.max_int8_loss_increase,
            opset=cfg.opset,
        )
        if not result.verdict.passed:
            raise StageError(
                STAGE.name,
                model.ref,
                result.verdict.message,
                "the model was not published; inspect the gate's checks in the log, or relax the export tolerances",
            )
        val = result.meta["val"]
        w.meta.update(
            {
                "gate": result.meta["gate"]["message"],
                "parity_max_abs_diff": result.meta["parity_max_abs_diff"],
                "val_loss": {k: v["loss"] for k, v in val.items()},
                "bytes": result.meta["bytes"],
                "files": result.meta["files"],
            }
        )
    return w.manifest


task = stage_task(STAGE, run)
