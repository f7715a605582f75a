"""Training entrypoint: ``python -m model.train --spec spec.json``, alone or under torchrun.

The spec is one JSON file, written by the pretrain/finetune tasks (``TrainSpec.save``) or
by hand. Relative paths in it are relative to the spec file's directory::

    {
      "out_dir": "runs/pretrain",          # checkpoints + metrics.jsonl; rerunning resumes here
      "artifact_dir": null,                # final model dir; null means <out_dir>/final
      "model": {"vocab_size": 8192, "block_size": 256, "n_layer": 4,
                "n_head": 4, "n_embd": 256},   # GPTConfig fields, for a model from scratch...
      "init_from": null,                   # ...or a model dir to start from (finetuning)
      "train": {"max_steps": 1000, "micro_batch_size": 8, "lr": 6e-4},   # TrainConfig fields; others default
      "data": {
        "train": [{"path": "shards/tokens-00000.bin", "dtype": "uint16"}],
        "val":   [{"path": "shards/val-00000.bin", "dtype": "uint16"}]   # optional
      },
      "lora": null                         # or {"r": 8, "alpha": 16, "dropout": 0.05,
                                           #     "targets": ["q_proj", "v_proj"]}
    }

Exactly one of ``model`` and ``init_from`` is given. Every rank builds the same model from
``seed`` (DDP also broadcasts rank 0's weights), trains with model.trainer.Trainer, and
rank 0 then publishes ``artifact_dir`` atomically:

    model.safetensors + config.json   the trained GPT; with LoRA, the adapters merged in
    summary.json                      the Trainer's summary plus the configs that made it
    adapter.safetensors + lora.json   with LoRA only: the adapters alone and their config
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch as st
import torch

from model import distributed
from model.checkpoint import load_model, save_model
from model.config import GPTConfig, LoRAConfig, TrainConfig
from model.data import TokenWindows, token_dtype
from model.gpt import GPT
from model.lifetime import die_with_parent
from model.lora import apply_lora, lora_state_dict, merge_lora
from model.trainer import Trainer
from storage.atomic import new_temp_dir, publish_dir

_KEYS = {"out_dir", "artifact_dir", "model", "init_from", "train", "data", "lora"}


def _resolve(base: Path, p: str | None) -> Path | None:
    """A spec path relative to the spec's directory (an absolute path stays as it is)."""
    return None if p is None else base / p


def _files_from_json(base: Path, entries: list[dict] | None) -> list[tuple[Path, str]]:
    return [(_resolve(base, e["path"]), e.get("dtype", "uint16")) for e in entries or []]


def _files_to_json(files: list[tuple[Path, str]]) -> list[dict]:
    return [{"path": str(p), "dtype": d} for p, d in files]


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs; the JSON form is documented in the module docstring."""

    out_dir: Path
    train_files: list[tuple[Path, str]]
    train: TrainConfig = field(default_factory=TrainConfig)
    val_files: list[tuple[Path, str]] = field(default_factory=list)
    model: GPTConfig | None = None
    init_from: Path | None = None
    lora: LoRAConfig | None = None
    artifact_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("out_dir", "artifact_dir", "init_from"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("train_files", "val_files"):
            object.__setattr__(self, name, [(Path(p), token_dtype(d).name) for p, d in getattr(self, name)])
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "a train spec needs exactly one of 'model' (train from scratch) and 'init_from' (a model dir)"
            )
        if not self.train_files:
            raise ValueError("a train spec needs at least one file in data.train")

    @property
    def final_dir(self) -> Path:
        return self.artifact_dir or self.out_dir / "final"

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "artifact_dir": str(self.artifact_dir) if self.artifact_dir else None,
            "model": json.loads(self.model.to_json()) if self.model else None,
            "init_from": str(self.init_from) if self.init_from else None,
            "train": self.train.to_dict(),
            "data": {"train": _files_to_json(self.train_files), "val": _files_to_json(self.val_files)},
            "lora": self.lora.to_dict() if self.lora else None,
        }

    @classmethod
    def from_dict(cls, d: dict, base: Path = Path(".")) -> "TrainSpec":
        unknown = set(d) - _KEYS
        if unknown:
            raise ValueError(f"unknown train spec keys: {sorted(unknown)} (known: {sorted(_KEYS)})")
        if "out_dir" not in d:
            raise ValueError("a train spec needs 'out_dir'")
        data = d.get("data") or {}
        return cls(
            out_dir=_resolve(base, d["out_dir"]),
            artifact_dir=_resolve(base, d.get("artifact_dir")),
            model=GPTConfig.from_dict(d["model"]) if d.get("model") else None,
            init_from=_resolve(base, d.get("init_from")),
            train=TrainConfig.from_dict(d.get("train") or {}),
            train_files=_files_from_json(base, data.get("train")),
            val_files=_files_from_json(base, data.get("val")),
            lora=LoRAConfig.from_dict(d["lora"]) if d.get("lora") else None,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainSpec":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), base=path.parent)


def build_model(spec: TrainSpec) -> GPT:
    """The model to train, identical on every rank: fresh from ``seed``, or loaded, then LoRA-wrapped."""
    torch.manual_seed(spec.train.seed)
    model = GPT(spec.model) if spec.model else load_model(spec.init_from)
    if spec.lora:
        apply_lora(model, spec.lora.targets, spec.lora.r, spec.lora.alpha, spec.lora.dropout)
    return model


def write_artifact(model: GPT, spec: TrainSpec, summary: dict) -> Path:
    """Publish the final model dir atomically (tmp dir, then rename); replaces an older one."""
    final = spec.final_dir
    tmp = new_temp_dir(final)
    model.to("cpu")
    if spec.lora:
        st.save_file(lora_state_dict(model), str(tmp / "adapter.safetensors"))
        (tmp / "lora.json").write_text(json.dumps(spec.lora.to_dict(), indent=2) + "\n")
        merge_lora(model)
    save_model(model, tmp)
    record = {
        **summary,
        "model_config": json.loads(model.config.to_json()),
        "train_config": spec.train.to_dict(),
        "lora": spec.lora.to_dict() if spec.lora else None,
        "init_from": str(spec.init_from) if spec.init_from else None,
    }
    (tmp / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    publish_dir(tmp, final, replace=True)
    return final


def run(spec: TrainSpec, info: distributed.DistInfo) -> dict:
    """Train per ``spec`` in this process (one rank of the job); rank 0 publishes the artifact."""
    model = build_model(spec)
    vocab = model.config.vocab_size
    train_data = TokenWindows(spec.train_files, seed=spec.train.seed, vocab_size=vocab)
    val_data = TokenWindows(spec.val_files, seed=spec.train.seed, vocab_size=vocab) if spec.val_files else None
    trainer = Trainer(
        model, spec.train, train_data, val_data, spec.out_dir, info.device, log=lambda line: print(line, flush=True)
    )
    summary = trainer.fit()
    summary.update(world=info.world, device=str(info.device))
    if info.rank == 0:
        final = write_artifact(trainer.model, spec, summary)
        print(f"wrote {final}", flush=True)
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--spec", required=True, help="path of the train spec JSON (format: module docstring)")
    args = parser.parse_args(argv)
    die_with_parent()  # torchrun's worker: gone when torchrun is (SIGKILL of the run included)
    spec = TrainSpec.load(args.spec)
    info = distributed.init_distributed()
    try:
        run(spec, info)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
