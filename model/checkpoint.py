"""Model files and resumable training checkpoints.

A model directory (what releases, evaluation and export read) is::

    model.safetensors   weights; a tied LM head is stored once (safetensors' save_model)
    config.json         the GPTConfig

A training checkpoint ``<out_dir>/ckpt-<step:08d>/`` is a model directory plus
``trainer.pt``: the optimizer state, the number of optimizer steps done (which is also the
data position and the LR schedule position, see model.data and model.optim), the
TrainConfig as a dict, and the torch CPU (and CUDA) RNG state of every rank.

Design decisions:
- Nothing is unpickled: weights are safetensors and ``trainer.pt`` holds only tensors,
  numbers, strings, lists and dicts, loaded with ``torch.load(weights_only=True)``.
- Atomic (:mod:`storage.atomic`): rank 0 writes into a ``.tmp-*`` sibling, fsyncs, then
  renames; a crash mid-save leaves the previous checkpoint as the latest, and a dead
  writer's ``.tmp-*`` dir is swept by the next save.
- Saving is collective (every rank calls it) because each rank's RNG state is gathered to
  rank 0. With DDP the weights and the optimizer state are identical on every rank, so
  rank 0's copy is the checkpoint.
- The last ``keep_last`` checkpoints are kept; older ones are deleted after a save succeeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch as st
import torch
import torch.distributed as dist
import torch.nn as nn

from model import distributed
from model.config import GPTConfig
from model.gpt import GPT
from storage.atomic import new_temp_dir, publish_dir

WEIGHTS, CONFIG, TRAINER_STATE = "model.safetensors", "config.json", "trainer.pt"
_PREFIX = "ckpt-"


def save_model(model: nn.Module, directory: str | Path) -> None:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st.save_model(model, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(model.config.to_json() + "\n")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The GPT stored in a model directory or training checkpoint (without adapters)."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: it needs {WEIGHTS} and {CONFIG}")
    model = GPT(GPTConfig.from_json((directory / CONFIG).read_text()))
    st.load_model(model, str(directory / WEIGHTS), device=str(device))
    return model.to(device)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Published checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_config: dict,
    keep_last: int,
) -> Path:
    """Publish ``ckpt-<step>`` atomically; call on every rank (RNG states are gathered)."""
    out_dir = Path(out_dir)
    world = distributed.world_size()
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs[0] = _rng_state()
    final = out_dir / f"{_PREFIX}{step:08d}"
    if distributed.is_main():
        tmp = new_temp_dir(final)
        save_model(model, tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "train_config": train_config,
            "rng_cpu": [r["cpu"] for r in rngs],
            "rng_cuda": [r["cuda"] for r in rngs] if "cuda" in rngs[0] else [],
        }
        torch.save(state, tmp / TRAINER_STATE)
        publish_dir(tmp, final, replace=True)  # the same step saved again (a rerun of a finished run) replaces it
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load_checkpoint(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and this rank's RNG; returns ``{"step", "train_config"}``."""
    ckpt = Path(ckpt)
    saved_cfg = GPTConfig.from_json((ckpt / CONFIG).read_text())
    if saved_cfg != model.config:
        raise ValueError(
            f"checkpoint {ckpt} holds a different model ({saved_cfg}) than the one being trained "
            f"({model.config}); use a new out_dir or the same model config"
        )
    device = next(model.parameters()).device
    st.load_model(model, str(ckpt / WEIGHTS), device=str(device))
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    r = distributed.rank()
    # A rank beyond the saved world (the job was resized) keeps its fresh seed: only
    # dropout draws from torch's RNG, the data order depends on the step alone.
    if r < len(state["rng_cpu"]):
        torch.set_rng_state(state["rng_cpu"][r])
    if torch.cuda.is_available() and r < len(state["rng_cuda"]):
        torch.cuda.set_rng_state(state["rng_cuda"][r])
    return {"step": int(state["step"]), "train_config": state["train_config"]}
