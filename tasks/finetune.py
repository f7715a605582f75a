"""Stage 9, finetune: LoRA adapters on a subset of the dataset chosen by SQL over the catalog.

The base model is frozen; only the adapters train (B starts at zero, so step 0 is the
base model exactly). The artifact holds the adapters on their own (``adapter.safetensors``
+ ``lora.json``, small, reusable) and the merged model (``model.safetensors``), which is
a plain GPT that evaluation and export use like any other, plus the metrics log and
its loss curve (``loss.png``).

``lora`` is a :class:`model.config.LoRAConfig` and ``train`` a
:class:`model.config.TrainConfig`: the classes the trainer runs with.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from model.config import LoRAConfig, TrainConfig
from storage.artifact import Manifest, Store
from tasks.modeling.subsets import select, write_token_file
from tasks.modeling.torchrun import data_files, publish_model, train_in_child
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, no_progress, stage_logger

STAGE = Stage("finetune", __name__)
MODEL_FILES = ("model.safetensors", "config.json", "summary.json", "adapter.safetensors", "lora.json")


class FinetuneConfig(StageConfig):
    """Which documents to finetune on, the adapters, and the run."""

    subset_sql: str = Field(
        "lang = 'en'",
        min_length=1,
        description="SQL condition over the catalog's documents table choosing the finetune set (e.g. lang = 'fr' AND lang_score > 0.9).",
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapter settings.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            max_steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_every=50
        ),
        description="Budget, batch and optimizer of the finetune run.",
    )

    @field_validator("subset_sql")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("subset_sql is empty: give a condition such as lang = 'fr'")
        return value


def run(
    store: Store,
    cfg: FinetuneConfig,
    base: Manifest,
    shards: Manifest,
    tokenizer: Manifest,
    progress: Progress = no_progress,
) -> Manifest:
    """LoRA-finetune ``base`` on the documents of ``shards`` that ``cfg.subset_sql`` selects."""
    b = STAGE.begin(store, cfg, base=base, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    dtype = shards.meta["dtype"]
    work = store.work_dir(STAGE.name, b.key)
    sizes = {}
    for split in ("train", "val"):
        rows = select(store, STAGE.name, shards, cfg.subset_sql, split)
        sizes[split] = (
            rows.num_rows,
            write_token_file(rows, dtype, work / f"subset-{split}.bin") if rows.num_rows else 0,
        )
    stage_logger(STAGE.name).info("finetune subset %r: %s (documents, tokens) per split", cfg.subset_sql, sizes)
    if sizes["train"][1] <= cfg.train.block_size:
        raise StageError(
            STAGE.name,
            f"subset {cfg.subset_sql!r}",
            f"selects {sizes['train'][0]} training documents with {sizes['train'][1]} tokens, not enough for one sequence of {cfg.train.block_size}",
            "widen finetune.subset_sql (see the catalog's documents table) or feed more data",
        )
    spec = {
        "init_from": str(base.dir),
        "train": cfg.train.to_dict(),
        "lora": cfg.lora.to_dict(),
        "data": {
            "train": data_files([work / "subset-train.bin"], dtype),
            "val": data_files([work / "subset-val.bin"], dtype) if sizes["val"][1] > cfg.train.block_size else [],
        },
    }
    final = train_in_child(STAGE.name, work, spec, cfg.train.nproc, progress)
    return publish_model(
        store,
        STAGE,
        b,
        final,
        tokenizer,
        model_files=MODEL_FILES,
        counters={
            "subset_docs": {s: n for s, (n, _) in sizes.items()},
            "subset_tokens": {s: t for s, (_, t) in sizes.items()},
        },
        meta={"eot_id": int(shards.meta["eot_id"]), "subset_sql": cfg.subset_sql},
    )


task = stage_task(STAGE, run, retries=1, retry_delay_seconds=10, progress="finetune: optimizer steps done")
