"""Checkpoint contracts: safetensors round trip (tied and untied), atomic publish, pruning, safe loading."""

import json

import pytest
import torch

from model.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from model.config import GPTConfig
from model.gpt import GPT
from model.optim import configure_optimizer

torch.set_num_threads(1)


def tiny(**kw):
    return GPTConfig(**{**dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw})


def trained(cfg):
    """A model and AdamW that took one step, so the optimizer holds real moments."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("tie", [True, False])
def test_model_round_trip(tmp_path, tie):
    model, _ = trained(tiny(tie_embeddings=tie))
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_embeddings"] is tie
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) is tie
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    idx = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_tied_weights_stored_once(tmp_path):
    model, _ = trained(tiny(tie_embeddings=True))
    save_model(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"tok_emb.weight", "lm_head.weight"}) == 1


def test_load_model_names_a_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)


def test_checkpoints_publish_atomically_and_keep_last(tmp_path):
    model, opt = trained(tiny())
    (tmp_path / ".tmp-ckpt-00000009-dead").mkdir()  # a crashed save
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, model, opt, {"lr": 1e-3}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000006", "ckpt-00000009"]
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt = latest_checkpoint(tmp_path)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "trainer.pt"}
    state = torch.load(ckpt / "trainer.pt", weights_only=True)  # no pickle execution needed
    assert state["step"] == 9 and state["train_config"] == {"lr": 1e-3} and len(state["rng_cpu"]) == 1
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_load_checkpoint_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained(tiny())
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 1, model, opt, {"seed": 1}, keep_last=1)
    expected_draw = torch.rand(4)

    torch.manual_seed(999)
    fresh = GPT(tiny())
    fresh_opt = configure_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95), "cpu")
    info = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert info == {"step": 1, "train_config": {"seed": 1}}
    assert torch.equal(torch.rand(4), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])


def test_load_checkpoint_refuses_another_model(tmp_path):
    model, opt = trained(tiny())
    save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    other = GPT(tiny(n_embd=64))
    with pytest.raises(ValueError, match="different model"):
        load_checkpoint(latest_checkpoint(tmp_path), other, configure_optimizer(other, 1e-3, 0.1, (0.9, 0.95), "cpu"))
