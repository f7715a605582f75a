"""Stage 11, export: ONNX with an explicit KV cache, onnxruntime INT8, Hugging Face, and the release gate.

The finetuned (merged) model is exported with dynamic batch, sequence and past length,
its LM head untied so dynamic quantization covers it, then quantized to INT8. The gate
compares ONNX fp32 logits to torch and INT8 validation loss to fp32 on held-out
documents; a failed gate fails the stage and publishes nothing, so no flow ships a
model that does not match what was evaluated.

Beside the ONNX files, the artifact holds the model in the formats other tools load
(:mod:`model.hf`): ``hf/``, the finetuned model as a Hugging Face Llama directory with its
tokenizer (transformers, vLLM, lm-evaluation-harness); and for a LoRA finetune
``hf-base/``, the pretrained model it started from, with ``hf-adapter/``, the adapter in
PEFT's format (``PeftModel.from_pretrained(<hf-base model>, "hf-adapter")``).
"""

from __future__ import annotations

from pathlib import Path

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
    int4: bool = Field(
        True, description="Also write weight-only INT4 (MatMulNBits) and hold it to max_int4_loss_increase."
    )
    max_int4_loss_increase: float = Field(
        0.05, ge=0, description="Largest allowed relative increase of INT4 validation loss over fp32 (0.05 = 5%)."
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
            int4=cfg.int4,
            max_int4_loss_increase=cfg.max_int4_loss_increase,
            opset=cfg.opset,
        )
        if not result.verdict.passed:
            raise StageError(
                STAGE.name,
                model.ref,
                result.verdict.message,
                "the model was not published; inspect the gate's checks in the log, or relax the export tolerances",
            )
        hf_files = _write_hf(store, model, gpt, w.dir, tokenizer.path("tokenizer.json"), int(shards.meta["eot_id"]))
        val = result.meta["val"]
        w.meta.update(
            {
                "gate": result.meta["gate"]["message"],
                "parity_max_abs_diff": result.meta["parity_max_abs_diff"],
                "val_loss": {k: v["loss"] for k, v in val.items()},
                "precisions": result.meta["precisions"],
                "bytes": result.meta["bytes"],
                "files": result.meta["files"],
                "hf": hf_files,
            }
        )
    return w.manifest


def _write_hf(store: Store, model: Manifest, gpt, out: Path, tokenizer_file: Path, eot_id: int) -> list[str]:
    """``hf/`` (and, for a LoRA finetune, ``hf-base/`` + ``hf-adapter/``) in ``out``; the directories written."""
    import safetensors.torch as st

    from model.checkpoint import load_model
    from model.config import LoRAConfig
    from model.hf import save_hf, save_peft_adapter

    save_hf(gpt, out / "hf", tokenizer_file, eot_id)
    names = {f.path for f in model.files}
    if not {"adapter.safetensors", "lora.json"} <= names:
        return ["hf"]
    base_ref = next((p for p in model.parents if p.startswith("pretrain/")), None)
    base = store.load(*base_ref.split("/")) if base_ref else None
    if base is None:
        raise StageError(STAGE.name, model.ref, f"its base model {base_ref} is not in the store", "rerun the pipeline")
    save_hf(load_model(base.dir).eval(), out / "hf-base", tokenizer_file, eot_id)
    lora = LoRAConfig.model_validate_json(model.path("lora.json").read_text())
    save_peft_adapter(
        st.load_file(str(model.path("adapter.safetensors"))), lora, gpt.config, out / "hf-adapter", "hf-base"
    )
    return ["hf", "hf-base", "hf-adapter"]


task = stage_task(STAGE, run)
