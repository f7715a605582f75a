"""Stage 9, finetune: LoRA adapters on a subset of the dataset chosen by SQL over the catalog.

The base model is frozen; only the adapters train (B starts at zero, so step 0 is the
base model exactly). The artifact holds the adapters on their own (``adapter.safetensors``
+ ``lora.json``, small, reusable) and the merged model (``model.safetensors``), which is
a plain GPT that evaluation and export use like any other, plus the metrics log and
its loss curve (``loss.png``).
"""

from __future__ import annotations

from pydantic import Field

from storage.artifact import Manifest, Store
from tasks.common import StageConfig, StageError, begin, code_version, stage_logger, stage_task
from tasks.subsets import select, write_token_file
from tasks.training import TrainSettings, copy_model_files, data_files, train_in_child, training_counters, write_loss_plot

STAGE = "finetune"
CODE_VERSION = code_version(__name__, "tasks.training", "tasks.subsets", "model.lora", "model.trainer", "model.train", "model.data")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(StageConfig):
    """Adapter shape (PEFT's and litgpt's knobs)."""

    r: int = Field(8, ge=1, le=256, description="Rank of the update B A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input in training.")
    targets: list[str] = Field(["q_proj", "v_proj"], min_length=1, description=f"Linear layers to adapt, among {', '.join(LORA_TARGETS)}.")


class FinetuneConfig(StageConfig):
    """Which documents to finetune on, the adapters, and the run."""

    subset_sql: str = Field("lang = 'en'", description="SQL condition over the catalog's documents table choosing the finetune set (e.g. lang = 'fr' AND lang_score > 0.9).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(max_steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_every=50),
        description="Budget, batch and optimizer of the finetune run.",
    )


def run(store: Store, cfg: FinetuneConfig, base: Manifest, shards: Manifest, tokenizer: Manifest) -> Manifest:
    b = begin(store, STAGE, CODE_VERSION, cfg, base=base, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    unknown = set(cfg.lora.targets) - set(LORA_TARGETS)
    if unknown:
        raise StageError(STAGE, "config lora.targets", f"unknown layers {sorted(unknown)}", f"choose among {', '.join(LORA_TARGETS)}")
    dtype = shards.meta["dtype"]
    work = store.work_dir(STAGE, b.key)
    sizes = {}
    for split in ("train", "val"):
        rows = select(store, STAGE, shards, cfg.subset_sql, split)
        sizes[split] = (rows.num_rows, write_token_file(rows, dtype, work / f"subset-{split}.bin") if rows.num_rows else 0)
    stage_logger(STAGE).info("finetune subset %r: %s (documents, tokens) per split", cfg.subset_sql, sizes)
    if sizes["train"][1] <= cfg.train.block_size:
        raise StageError(
            STAGE, f"subset {cfg.subset_sql!r}", f"selects {sizes['train'][0]} training documents with {sizes['train'][1]} tokens, not enough for one sequence of {cfg.train.block_size}",
            "widen finetune.subset_sql (see the catalog's documents table) or feed more data",
        )
    spec = {
        "init_from": str(base.dir),
        "train": cfg.train.train_dict(),
        "lora": cfg.lora.model_dump(),
        "data": {"train": data_files([work / "subset-train.bin"], dtype),
                 "val": data_files([work / "subset-val.bin"], dtype) if sizes["val"][1] > cfg.train.block_size else []},
    }
    final = train_in_child(STAGE, work, spec, cfg.train.nproc)
    with store.writer(STAGE, b.key, parents=b.parents, config=b.config, code_version=CODE_VERSION) as w:
        copy_model_files(final, w.dir, ("model.safetensors", "config.json", "summary.json", "adapter.safetensors", "lora.json"))
        copy_model_files(final.parent / "checkpoints", w.dir, ("metrics.jsonl",))
        write_loss_plot(STAGE, w.dir / "metrics.jsonl", w.dir / "loss.png")
        copy_model_files(tokenizer.dir, w.dir, ("tokenizer.json",))
        w.counters.update(training_counters(final))
        w.counters.update({"subset_docs": {s: n for s, (n, _) in sizes.items()}, "subset_tokens": {s: t for s, (_, t) in sizes.items()}})
        w.meta.update({"eot_id": int(shards.meta["eot_id"]), "subset_sql": cfg.subset_sql})
    return w.manifest


task = stage_task(run, name=STAGE, retries=1, retry_delay_seconds=10)
