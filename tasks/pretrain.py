"""Stage 8, pretrain: the GPT of model/ on a shards artifact, in a torchrun child.

DDP over nccl on GPUs and gloo on CPU (``train.nproc``). The model's vocabulary comes
from the shards (the tokenizer's), its shape from this config. The artifact holds the
final weights (safetensors), their config, the tokenizer, the training summary, the
metrics log and its loss curve (``loss.png``); checkpoints to resume from live in the
store's work directory.
"""

from __future__ import annotations

from pydantic import Field

from storage.artifact import Manifest, Store
from tasks.common import StageConfig, StageError, begin, code_version, stage_task
from tasks.training import TrainSettings, copy_model_files, data_files, train_in_child, training_counters, write_loss_plot

STAGE = "pretrain"
CODE_VERSION = code_version(__name__, "tasks.training", "model.gpt", "model.trainer", "model.train", "model.data", "model.optim")


class ModelShape(StageConfig):
    """The GPT's shape (model.config.GPTConfig less the vocabulary, which the tokenizer fixes)."""

    block_size: int = Field(256, ge=8, le=8192, description="Context length in tokens.")
    n_layer: int = Field(4, ge=1, le=96, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads (n_embd must divide by it).")
    n_embd: int = Field(256, ge=16, le=16384, description="Residual stream width.")
    mlp_hidden: int = Field(0, ge=0, description="SwiGLU hidden width; 0: 8/3 n_embd rounded to 64.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in training.")
    tie_embeddings: bool = Field(True, description="Share embedding and LM head (export unties it for INT8).")


class PretrainConfig(StageConfig):
    """Model shape and training run."""

    model: ModelShape = Field(default_factory=ModelShape, description="Shape of the GPT.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Budget, batch and optimizer.")


def run(store: Store, cfg: PretrainConfig, shards: Manifest, tokenizer: Manifest) -> Manifest:
    """Train from scratch on the train split; validation loss on the val split."""
    b = begin(store, STAGE, CODE_VERSION, cfg, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    if cfg.train.block_size > cfg.model.block_size:
        raise StageError(STAGE, "config", f"train.block_size {cfg.train.block_size} exceeds model.block_size {cfg.model.block_size}")
    dtype = shards.meta["dtype"]
    train = [shards.path(f.path) for f in shards.files_with_prefix("tokens-train-") if f.path.endswith(".bin")]
    val = [shards.path(f.path) for f in shards.files_with_prefix("tokens-val-") if f.path.endswith(".bin")]
    if not train:
        raise StageError(STAGE, shards.ref, "the dataset has no training tokens", "check the data-refresh funnel")
    spec = {
        "model": {**cfg.model.model_dump(), "vocab_size": int(shards.meta["vocab_size"])},
        "train": cfg.train.train_dict(),
        "data": {"train": data_files(train, dtype), "val": data_files(val, dtype)},
    }
    final = train_in_child(STAGE, store.work_dir(STAGE, b.key), spec, cfg.train.nproc)
    with store.writer(STAGE, b.key, parents=b.parents, config=b.config, code_version=CODE_VERSION) as w:
        copy_model_files(final, w.dir, ("model.safetensors", "config.json", "summary.json"))
        copy_model_files(final.parent / "checkpoints", w.dir, ("metrics.jsonl",))
        write_loss_plot(STAGE, w.dir / "metrics.jsonl", w.dir / "loss.png")
        copy_model_files(tokenizer.dir, w.dir, ("tokenizer.json",))
        w.counters.update(training_counters(final))
        w.meta.update({"eot_id": int(shards.meta["eot_id"]), "vocab_size": int(shards.meta["vocab_size"])})
    return w.manifest


task = stage_task(run, name=STAGE, retries=1, retry_delay_seconds=10)
