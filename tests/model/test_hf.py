"""The Hugging Face export: transformers and peft load it offline and compute what lmforge's GPT computes."""

import os

import numpy as np
import pytest
import torch

from model.config import GPTConfig, LoRAConfig
from model.generate import generate
from model.gpt import GPT
from model.hf import half_to_interleaved, interleaved_to_half, load_hf, save_hf, save_peft_adapter
from model.lora import apply_lora, lora_state_dict, merge_lora
from tests.model.tiny import EOT, TEXT, build_tokenizer, train_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def held_out(tok) -> torch.Tensor:
    ids = tok.encode("a dog sat on the park. the mat ran to the cat. " * 4).ids
    return torch.tensor([ids[:30], ids[5:35]])


def test_rope_row_permutation_round_trips():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of head_dim 4
    half = interleaved_to_half(w, 2)
    assert half[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # per head: rows 0, 2, 1, 3
    assert torch.equal(half_to_interleaved(half, 2), w)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_transformers_loads_it_and_matches_logits_and_greedy_tokens(tokenizer_file, tmp_path, tied):
    torch.set_num_threads(1)
    tok, tok_path = tokenizer_file
    eot = tok.token_to_id(EOT)
    model = train_tiny(tok, eot, tie_embeddings=tied, rope_theta=5000.0, norm_eps=1e-6)
    out = save_hf(model, tmp_path / "hf", tok_path, eot)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == tied
    x = held_out(tok)
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = tok.encode("the cat").ids
    mine = generate(model, prompt, 12, temperature=0.0)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert gen[0, len(prompt) :].tolist() == mine

    back = load_hf(out)  # and lmforge reads it back (the torch serving backend does)
    assert back.config.tie_embeddings == tied and back.config.hidden == model.config.hidden
    with torch.no_grad():
        assert torch.equal(back(x)[0], ours)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.encode(TEXT) == tok.encode(TEXT).ids
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == eot
    assert hf_tok.decode(tok.encode(TEXT).ids) == TEXT


def test_peft_loads_the_adapter_and_reproduces_the_merged_model(tokenizer_file, tmp_path):
    peft = pytest.importorskip("peft")
    torch.set_num_threads(1)
    tok, tok_path = tokenizer_file
    eot = tok.token_to_id(EOT)
    base = train_tiny(tok, eot)
    save_hf(base, tmp_path / "base", tok_path, eot)

    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "down_proj"])
    tuned = GPT(base.config)
    tuned.load_state_dict(base.state_dict())
    apply_lora(tuned, tuple(lora.targets), lora.r, lora.alpha, lora.dropout)
    torch.manual_seed(1)
    for name, p in tuned.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    adapter = lora_state_dict(tuned)
    merge_lora(tuned)
    save_peft_adapter(adapter, lora, base.config, tmp_path / "adapter", str(tmp_path / "base"))

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    x = held_out(tok)
    with torch.no_grad():
        merged, _ = tuned.eval()(x)
        base_logits, _ = base(x)
        theirs = adapted(x).logits
    assert (merged - base_logits).abs().max().item() > 1e-2  # the adapter changes the model...
    assert (merged - theirs).abs().max().item() < 1e-4  # ...and peft applies exactly that change
    assert np.isfinite(theirs.numpy()).all()


def test_load_hf_names_what_is_missing(tokenizer_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    tok, tok_path = tokenizer_file
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=2, n_head=2, n_embd=16))
    out = save_hf(model, tmp_path / "hf", tok_path, tok.token_to_id(EOT))
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(out)
