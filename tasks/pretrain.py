"""Stage 8, pretrain: the GPT of model/ on a shards artifact, in a torchrun child.

DDP over nccl on GPUs and gloo on CPU (``train.nproc``). The model's vocabulary comes
from the shards (the tokenizer's), its shape from this config. The artifact holds the
final weights (safetensors), their config, the tokenizer, the training summary, the
metrics log and its loss curve (``loss.png``); checkpoints to resume from live in the
store's work directory.

With ``init`` (a trained model artifact of the same shape and tokenizer: the deploy flow's
promoted model, when ``continue_from_promoted`` is on) training starts from its weights
instead of from scratch; the flow decides whether it may (:mod:`flows.pretrain`).

The config is the model's own: ``model`` is a :class:`model.config.GPTConfig` and
``train`` a :class:`model.config.TrainConfig`, the classes the trainer runs with.
"""

from __future__ import annotations

import json

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
    continue_from_promoted: bool = Field(
        False,
        description="Start from the weights of the model promoted for the deploy target when it has this dataset's tokenizer and this model shape; from scratch otherwise (the log says why).",
    )

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


def shape_mismatch(cfg: PretrainConfig, vocab_size: int, model_config: dict) -> str | None:
    """Why a trained model's ``config.json`` cannot be continued under ``cfg`` (None when it can)."""
    wanted = {**cfg.model.to_dict(), "vocab_size": vocab_size}
    differ = sorted(k for k in wanted if k != "dropout" and model_config.get(k) != wanted[k])
    if differ:
        return ", ".join(f"{k} {model_config.get(k)} (config: {wanted[k]})" for k in differ)
    return None


def run(
    store: Store,
    cfg: PretrainConfig,
    shards: Manifest,
    tokenizer: Manifest,
    init: Manifest | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Train on the train split, from scratch or from ``init``'s weights; validation loss on the val split."""
    b = STAGE.begin(store, cfg, shards=shards, tokenizer=tokenizer, init=init)
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
    if init is not None:
        if tokenizer.ref not in init.parents:
            raise StageError(STAGE.name, init.ref, f"was not trained with this dataset's tokenizer {tokenizer.ref}")
        why = shape_mismatch(cfg, int(shards.meta["vocab_size"]), json.loads(init.path("config.json").read_text()))
        if why:
            raise StageError(STAGE.name, init.ref, f"its shape differs from pretrain.model: {why}")
        spec["init_from"] = str(init.dir)
        del spec["model"]
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
