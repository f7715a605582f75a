"""Trainer contracts: data windows, LR schedule, optimizer groups, FLOPs, learning, exact resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import latest_checkpoint, load_model
from model.config import GPTConfig, TrainConfig
from model.data import TokenWindows
from model.flops import estimate_mfu, flops_per_token, matmul_params, peak_flops
from model.gpt import GPT
from model.optim import configure_optimizer, get_lr
from model.trainer import Trainer

torch.set_num_threads(1)

TINY = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


def write_tokens(path, tokens, dtype="uint16"):
    np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tofile(path)
    return path, dtype


def repetitive(n, period=11, vocab=64):
    """A corpus a tiny model can learn: a fixed cycle of token ids."""
    return (np.arange(n) * 7 % period + 3) % vocab


def train_cfg(**kw):
    base = dict(
        max_steps=6,
        micro_batch_size=4,
        block_size=16,
        warmup_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        ckpt_every=3,
    )
    return TrainConfig(**{**base, **kw})


def read_metrics(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --- data ---------------------------------------------------------------------------------


def test_windows_are_deterministic_shifted_and_span_files(tmp_path):
    a = write_tokens(tmp_path / "a.bin", np.arange(0, 50))
    b = write_tokens(tmp_path / "b.bin", np.arange(50, 80), "uint32")
    empty = write_tokens(tmp_path / "e.bin", [])
    data = TokenWindows([a, empty, b], seed=3)
    assert len(data) == 80
    x, y = data.batch(step=5, micro_step=1, rank=0, world=1, batch_size=64, block_size=10)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (64, 10)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids: windows cross a.bin -> b.bin intact
    assert bool((x[:, 0] < 50).any() and (x[:, -1] >= 50).any())
    x2, _ = TokenWindows([a, empty, b], seed=3).batch(5, 1, 0, 1, 64, 10)
    assert torch.equal(x, x2)
    x3, _ = data.batch(6, 1, 0, 1, 64, 10)
    assert not torch.equal(x, x3)


def test_ranks_split_the_global_batch(tmp_path):
    data = TokenWindows([write_tokens(tmp_path / "a.bin", np.arange(1000) % 500)], seed=1)
    whole, _ = data.batch(2, 0, rank=0, world=1, batch_size=6, block_size=8)
    parts = [data.batch(2, 0, rank=r, world=3, batch_size=2, block_size=8)[0] for r in range(3)]
    assert torch.equal(whole, torch.cat(parts))


def test_windows_reject_bad_input(tmp_path):
    small = write_tokens(tmp_path / "s.bin", np.arange(10))
    with pytest.raises(ValueError, match="block_size\\+1 = 11 tokens, got 10"):
        TokenWindows([small]).batch(0, 0, 0, 1, 1, 10)
    TokenWindows([small]).batch(0, 0, 0, 1, 1, 9)
    with pytest.raises(ValueError, match="token id 40 >= vocab_size 32"):
        TokenWindows([write_tokens(tmp_path / "v.bin", [40] * 20)], vocab_size=32).batch(0, 0, 0, 1, 1, 8)
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a whole number of uint16"):
        TokenWindows([(tmp_path / "odd.bin", "uint16")])
    with pytest.raises(ValueError, match="token dtype"):
        TokenWindows([(small[0], "int64")])
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenWindows([(tmp_path / "missing.bin", "uint16")])


# --- schedule, optimizer, FLOPs -----------------------------------------------------------


def test_get_lr_warmup_peak_cosine_end():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert get_lr(0, cfg) == pytest.approx(1e-4)
    assert get_lr(4, cfg) == pytest.approx(5e-4)
    assert get_lr(9, cfg) == pytest.approx(1e-3)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(5.5e-4)  # half way down the cosine
    assert get_lr(110, cfg) == pytest.approx(1e-4)
    assert get_lr(500, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert get_lr(0, TrainConfig(max_steps=10, warmup_steps=0, lr=1e-3)) == pytest.approx(1e-3)


def test_optimizer_decays_only_matmul_weights():
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    decay, other = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    assert id(named["tok_emb.weight"]) in other and id(named["norm.weight"]) in other
    assert id(named["blocks.0.attn_norm.weight"]) in other
    assert id(named["lm_head.weight"]) in decay and id(named["blocks.1.mlp.down_proj.weight"]) in decay
    assert len(decay) + len(other) == len(named)


def test_flops_formula_and_peaks():
    cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    n = matmul_params(model)
    per_layer = 4 * 256 * 256 + 3 * 256 * cfg.hidden + 2 * 256
    assert n == 4 * per_layer + 256 + 8192 * 256  # blocks, final norm, tied head
    assert flops_per_token(cfg, 256, n) == 6 * n + 12 * 4 * 4 * 64 * 256
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("Some Future GPU") is None
    assert estimate_mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


def test_train_config_validates():
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match=r"max_step\n.*Extra inputs are not permitted"):
        TrainConfig.from_dict({"max_step": 3})
    assert TrainConfig.from_dict({"betas": [0.8, 0.9]}).betas == [0.8, 0.9]


# --- training -----------------------------------------------------------------------------


def test_loss_decreases_on_a_repetitive_corpus(tmp_path):
    data = TokenWindows([write_tokens(tmp_path / "t.bin", repetitive(4000))], seed=0)
    torch.manual_seed(0)
    cfg = train_cfg(max_steps=40, log_every=5, eval_every=0, ckpt_every=0, lr=1e-2, min_lr=1e-3, warmup_steps=4)
    summary = Trainer(GPT(TINY), cfg, data, data, tmp_path / "run", log=lambda _: None).fit()
    losses = read_metrics(tmp_path / "run")
    assert losses[5] > 2.5  # ~ln(11) before the cycle is learnt
    assert summary["train_loss"] < 0.5 and summary["val_loss"] < 0.5
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 16 and summary["stopped_by"] == "max_steps"


def test_resume_is_exact(tmp_path):
    """Uninterrupted 6 steps == stop after 1, stop after 2, resume to 6 (dropout on: the RNG is restored)."""
    cfg_model = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    train = TokenWindows([write_tokens(tmp_path / "t.bin", repetitive(3000, period=13))], seed=7)
    val = TokenWindows([write_tokens(tmp_path / "v.bin", repetitive(500, period=13))], seed=7)

    def fresh():
        torch.manual_seed(0)
        return GPT(cfg_model)

    whole = Trainer(fresh(), train_cfg(), train, val, tmp_path / "whole", log=lambda _: None).fit()
    parts = tmp_path / "parts"
    first = Trainer(fresh(), train_cfg(max_minutes=1e-9), train, val, parts, log=lambda _: None).fit()
    second = Trainer(fresh(), train_cfg(max_minutes=1e-9), train, val, parts, log=lambda _: None).fit()
    lines = []
    third = Trainer(fresh(), train_cfg(), train, val, parts, log=lines.append).fit()

    assert (first["steps"], first["stopped_by"]) == (1, "max_minutes")
    assert (second["steps"], second["resumed_from"]) == (2, 1)
    assert (third["steps"], third["resumed_from"], third["steps_this_run"]) == (6, 2, 4)
    assert any("resumed from" in line and "max_minutes" in line for line in lines)
    assert read_metrics(parts) == read_metrics(tmp_path / "whole")
    assert third["train_loss"] == whole["train_loss"] and third["val_loss"] == whole["val_loss"]
    a = load_model(latest_checkpoint(tmp_path / "whole")).state_dict()
    b = load_model(latest_checkpoint(parts)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert latest_checkpoint(parts).name == "ckpt-00000006"
    assert math.isfinite(whole["tokens_per_s"]) and whole["tokens"] == 6 * 4 * 16


def test_train_spec_resolves_paths_and_rejects_ambiguity(tmp_path):
    from model.train import TrainSpec

    spec_json = {
        "out_dir": "out",
        "model": {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 5, "warmup_steps": 1},
        "data": {"train": [{"path": "a.bin", "dtype": "uint16"}, {"path": "/abs/b.bin", "dtype": "uint32"}]},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec_json))
    spec = TrainSpec.load(tmp_path / "spec.json")
    assert spec.out_dir == tmp_path / "out" and spec.final_dir == tmp_path / "out" / "final"
    assert spec.train_files == [(tmp_path / "a.bin", "uint16"), (Path("/abs/b.bin"), "uint32")]
    assert spec.train.max_steps == 5 and spec.val_files == [] and spec.lora is None
    with pytest.raises(ValueError, match="exactly one of 'model'"):
        TrainSpec.from_dict({**spec_json, "init_from": "base"})
    with pytest.raises(ValueError, match="unknown train spec keys"):
        TrainSpec.from_dict({**spec_json, "epochs": 3})
