"""LoRA maths (after litgpt's test_lora_merge) and a LoRA finetune through model.train."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_model, save_model
from model.config import LINEAR_LAYERS, GPTConfig, LoRAConfig, TrainConfig
from model.distributed import DistInfo
from model.gpt import GPT
from model.lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora
from model.optim import configure_optimizer
from model.train import TrainSpec, run

torch.set_num_threads(1)

TINY = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


def lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = GPT(TINY)
    model = GPT(TINY)
    model.load_state_dict(base.state_dict())
    return base, apply_lora(model, r=4, alpha=8, dropout=0.0, **kw)


def one_step(model):
    opt = configure_optimizer(model, 1e-2, 0.0, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()


def test_adapter_starts_as_a_no_op():
    base, model = lora_model()
    q = model.blocks[0].attn.q_proj
    assert isinstance(q, LoRALinear) and torch.all(q.lora_B == 0) and q.lora_A.abs().sum() > 0
    assert q.scale == 2.0
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx)[0], base(idx)[0], rtol=0, atol=0)


def test_only_adapters_train_and_base_is_untouched():
    _, model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"
    }
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    one_step(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.blocks[0].attn.q_proj.lora_B.abs().sum() > 0


def test_merge_is_w_plus_ba_scale_idempotent_and_keeps_logits():
    _, model = lora_model()
    one_step(model)
    model.eval()
    idx = torch.randint(0, 64, (2, 16))
    unmerged = model(idx)[0]
    q = model.blocks[1].attn.q_proj
    expected = q.base.weight.detach() + q.lora_B.detach() @ q.lora_A.detach() * q.scale
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(GPT(TINY).state_dict())  # a plain GPT again
    torch.testing.assert_close(model.blocks[1].attn.q_proj.weight, expected)
    torch.testing.assert_close(model(idx)[0], unmerged, rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_state_round_trip_and_mismatch():
    _, model = lora_model(targets=("q_proj", "v_proj", "down_proj"))
    one_step(model)
    state = lora_state_dict(model)
    assert len(state) == 2 * 3 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    _, other = lora_model(seed=1, targets=("q_proj", "v_proj", "down_proj"))
    load_lora(other, state)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    _, narrow = lora_model()
    with pytest.raises(ValueError, match="missing"):
        load_lora(narrow, {k: v for k, v in state.items() if "down_proj" not in k} | {"x.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="no Linear module named"):
        apply_lora(GPT(TINY), targets=("c_attn",))
    with pytest.raises(ValueError, match=r"r\n.*greater than or equal to 1"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['c_attn'\]"):
        LoRAConfig(targets=["q_proj", "c_attn"])


def test_lora_targets_are_the_gpts_linear_layers():
    """LINEAR_LAYERS (what a config may name) is exactly the set of Linear names inside a block."""
    block_linears = {
        n.rpartition(".")[2] for n, m in GPT(TINY).blocks[0].named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert block_linears == set(LINEAR_LAYERS)


def test_lora_finetune_through_train_spec(tmp_path):
    """init_from a base dir + lora: the artifact holds adapters and a merged plain GPT that matches them."""
    torch.manual_seed(0)
    save_model(GPT(TINY), tmp_path / "base")
    (np.arange(3000) % 17).astype("<u2").tofile(tmp_path / "ft.bin")
    spec = TrainSpec(
        out_dir=tmp_path / "run",
        init_from=tmp_path / "base",
        train=TrainConfig(
            max_steps=4,
            micro_batch_size=2,
            block_size=16,
            warmup_steps=1,
            lr=1e-2,
            min_lr=1e-3,
            log_every=2,
            eval_every=0,
            ckpt_every=0,
        ),
        train_files=[(tmp_path / "ft.bin", "uint16")],
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
    )
    spec.save(tmp_path / "spec.json")
    loaded = TrainSpec.load(tmp_path / "spec.json")
    assert loaded == spec
    summary = run(loaded, DistInfo(rank=0, local_rank=0, world=1, device=torch.device("cpu")))
    final = tmp_path / "run" / "final"
    assert {p.name for p in final.iterdir()} == {
        "model.safetensors",
        "config.json",
        "summary.json",
        "adapter.safetensors",
        "lora.json",
    }
    record = json.loads((final / "summary.json").read_text())
    assert record["steps"] == 4 and record["lora"]["r"] == 4 and summary["trainable_params"] == 2 * 2 * 4 * 64

    merged = load_model(final).eval()
    unmerged = apply_lora(load_model(tmp_path / "base"), r=4, alpha=8, dropout=0.0).eval()
    load_lora(unmerged, load_file(str(final / "adapter.safetensors")))
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(merged(idx)[0], unmerged(idx)[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged(idx)[0], load_model(tmp_path / "base")(idx)[0])
