"""Stage 8, pretrain: the GPT of model/ on a shards artifact, in a torchrun child.

DDP over nccl on GPUs and gloo on CPU (``train.nproc``). The model's vocabulary comes
from the shards (the tokenizer's), its shape from this config. The artifact holds the
final weights (safetensors), their config, the tokenizer, the training summary, the
metrics log and its loss curve (``loss.png``); checkpoints to resume from live in the
store's work directory.

The config is the model's own: ``model`` is a :class:`model.config.GPTConfig` and
``train`` a :class:`model.config.TrainConfig`, the classes the trainer runs with.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from model.config import GPTConfig, TrainConfig
from storage.artifact import Manifest, Store
from tasks.modeling.torchrun import data_files, publish_model, train_in_child
from tasks.prefect_task import stage_task
from tasks.stage import Progress, Stage, StageConfig, StageError, no_progress

STAGE = Stage("pretrain", __name__)


class PretrainConfig(StageConfig):
    """Model shape and training run."""

    model: GPTConfig = Field(
        default_factory=GPTConfig, description="Shape of the GPT (its vocabulary is the tokenizer's)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Budget, batch and optimizer.")

    @model_validator(mode="after")
    def _fits(self) -> "PretrainConfig":
        if self.model.vocab_size is not None:
            raise ValueError(
                "model.vocab_size comes from the tokenizer: leave it out and set tokenizer.vocab_size instead"
            )
        if self.train.block_size > self.model.block_size:
            raise ValueError(
                f"train.block_size ({self.train.block_size}) exceeds model.block_size ({self.model.block_size})"
            )
        return self


def run(
    store: Store, cfg: PretrainConfig, shards: Manifest, tokenizer: Manifest, progress: Progress = no_progress
) -> Manifest:
    """Train from scratch on the train split; validation loss on the val split."""
    b = STAGE.begin(store, cfg, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    dtype = shards.meta["dtype"]
    train = [shards.path(f.path) for f in shards.files_with_prefix("tokens-train-") if f.path.endswith(".bin")]
    val = [shards.path(f.path) for f in shards.files_with_prefix("tokens-val-") if f.path.endswith(".bin")]
    if not train:
        raise StageError(STAGE.name, shards.ref, "the dataset has no training tokens", "check the data-refresh funnel")
    spec = {
        "model": {**cfg.model.to_dict(), "vocab_size": int(shards.meta["vocab_size"])},
        "train": cfg.train.to_dict(),
        "data": {"train": data_files(train, dtype), "val": data_files(val, dtype)},
    }
    final = train_in_child(STAGE.name, store.work_dir(STAGE.name, b.key), spec, cfg.train.nproc, progress)
    return publish_model(
        store,
        STAGE,
        b,
        final,
        tokenizer,
        meta={"eot_id": int(shards.meta["eot_id"]), "vocab_size": int(shards.meta["vocab_size"])},
    )


task = stage_task(STAGE, run, retries=1, retry_delay_seconds=10, progress="pretrain: optimizer steps done")
