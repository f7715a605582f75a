"""The GPT in Hugging Face's Llama format, and its LoRA adapter in PEFT's: what the ecosystem loads.

``transformers.AutoModelForCausalLM.from_pretrained(dir)``, ``AutoTokenizer``, vLLM
(``vllm serve dir``) and lm-evaluation-harness (``--model hf``) read the directory that
:func:`save_hf` writes; ``peft.PeftModel.from_pretrained(base, adapter_dir)`` reads
:func:`save_peft_adapter`'s. Nothing here imports transformers or peft: the files are
written from their documented formats, and the tests load them with the real libraries.

Design decisions:
- The GPT is a Llama already (pre-norm RMSNorm, SwiGLU, RoPE, no biases, one KV head
  per query head), so the mapping is a renaming, except for RoPE's layout: lmforge rotates
  interleaved pairs (x0, x1), (x2, x3)... (Meta's layout); HF's Llama rotates the first
  half of a head against the second. The q_proj and k_proj rows of each head are permuted
  from one layout to the other (:func:`interleaved_to_half`), the same permutation HF's
  own Meta-checkpoint converter applies; LoRA's B of those projections gets the same row
  permutation (A is untouched), so the adapter still adds ``P B A`` to ``P W``.
- Weights are fp32 (what lmforge trains and evaluates in); a tied head is written once
  (``tie_word_embeddings``), as HF saves it.
- ``rope_theta`` is written both at the top level (older readers, vLLM) and in
  ``rope_parameters`` (transformers 5).
- The tokenizer is lmforge's own ``tokenizer.json`` (a ``tokenizers`` file, which
  ``PreTrainedTokenizerFast`` loads as is) with the end-of-text token as EOS (and BOS,
  the document separator during training), and ``model_max_length`` = the context.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch as st
import torch

from model.config import GPTConfig, LoRAConfig
from model.gpt import GPT

HF_WEIGHTS = "model.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"


def interleaved_to_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or LoRA B) from interleaved-pair RoPE order to half-split order, per head."""
    out_features = w.shape[0]
    head_dim = out_features // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(out_features, *w.shape[1:])


def half_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half`."""
    out_features = w.shape[0]
    head_dim = out_features // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(out_features, *w.shape[1:])


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _hf_names(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """(lmforge name, LlamaForCausalLM name, whether its rows change RoPE layout) for every weight."""
    names = [("tok_emb.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (src + "attn_norm.weight", dst + "input_layernorm.weight", False),
            (src + "mlp_norm.weight", dst + "post_attention_layernorm.weight", False),
        ]
        names += [(src + f"attn.{p}.weight", dst + f"self_attn.{p}.weight", p in ("q_proj", "k_proj")) for p in QKVO]
        names += [
            (src + f"mlp.{p}.weight", dst + f"mlp.{p}.weight", False) for p in ("gate_proj", "up_proj", "down_proj")
        ]
    return names


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The GPT's weights under LlamaForCausalLM's names, RoPE rows permuted, fp32, contiguous."""
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return {
        hf: (interleaved_to_half(sd[ours], cfg.n_head) if rope else sd[ours]).contiguous()
        for ours, hf, rope in _hf_names(cfg)
    }


def load_hf(hf_dir: str | Path, block_size: int | None = None) -> GPT:
    """The GPT in a directory :func:`save_hf` wrote: its inverse, for serving the HF export with torch.

    Reads ``config.json`` (a Llama with one KV head per query head and no biases, as
    :func:`hf_config` writes it) and ``model.safetensors``; ``block_size`` defaults to
    ``max_position_embeddings``. Raises ValueError naming what does not fit.
    """
    hf_dir = Path(hf_dir)
    for name in ("config.json", HF_WEIGHTS):
        if not (hf_dir / name).is_file():
            raise FileNotFoundError(f"{hf_dir / name} not found: not a Hugging Face directory written by lmforge")
    c = json.loads((hf_dir / "config.json").read_text())
    if (
        c.get("model_type") != "llama"
        or c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]
    ):
        raise ValueError(f"{hf_dir}: lmforge reads back Llama directories with one KV head per query head")
    cfg = GPTConfig(
        vocab_size=c["vocab_size"],
        block_size=block_size or c["max_position_embeddings"],
        n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"],
        n_embd=c["hidden_size"],
        mlp_hidden=c["intermediate_size"],
        rope_theta=c.get("rope_theta", 10000.0),
        norm_eps=c["rms_norm_eps"],
        tie_embeddings=c.get("tie_word_embeddings", False),
    )
    tensors = st.load_file(str(hf_dir / HF_WEIGHTS))
    missing = [hf for _, hf, _ in _hf_names(cfg) if hf not in tensors]
    if missing:
        raise ValueError(f"{hf_dir / HF_WEIGHTS}: tensors {missing[:3]} are missing")
    model = GPT(cfg)
    state = {
        ours: half_to_interleaved(tensors[hf], cfg.n_head) if rope else tensors[hf] for ours, hf, rope in _hf_names(cfg)
    }
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_config(cfg: GPTConfig, eos_id: int) -> dict:
    """``config.json`` of the equivalent LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def save_hf(model: GPT, out_dir: str | Path, tokenizer_file: str | Path, eos_id: int) -> Path:
    """Write a Hugging Face Llama directory for ``model`` and its tokenizer; returns it.

    ``eos_id`` is the end-of-text token the model was trained with (the document separator).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    st.save_file(hf_state_dict(model), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eos_id), indent=2) + "\n")
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    eos = _token_text(Path(tokenizer_file), eos_id)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "model_max_length": cfg.block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos, "eos_token": eos, "pad_token": eos}, indent=2) + "\n"
    )
    return out


def save_peft_adapter(
    adapter: dict[str, torch.Tensor], lora: LoRAConfig, cfg: GPTConfig, out_dir: str | Path, base: str
) -> Path:
    """Write lmforge's LoRA adapter (``lora_state_dict`` names) in PEFT's format for the HF base ``base``.

    ``base`` goes into ``adapter_config.json`` as ``base_model_name_or_path`` (a path or hub
    name a reader can load the base from).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in adapter.items():
        # blocks.{i}.attn.q_proj.lora_A -> base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
        block, i, part, proj, which = name.split(".")
        if block != "blocks" or which not in ("lora_A", "lora_B"):
            raise ValueError(f"not a LoRA adapter tensor of the GPT: {name!r}")
        where = {"attn": "self_attn", "mlp": "mlp"}[part]
        t = t.detach().to("cpu", torch.float32)
        if which == "lora_B" and proj in ("q_proj", "k_proj"):
            t = interleaved_to_half(t, cfg.n_head)
        tensors[f"base_model.model.model.layers.{i}.{where}.{proj}.{which}.weight"] = t.contiguous()
    st.save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _token_text(tokenizer_file: Path, token_id: int) -> str:
    vocab = json.loads(tokenizer_file.read_text())
    for added in vocab.get("added_tokens", []):
        if added["id"] == token_id:
            return added["content"]
    for token, i in vocab["model"]["vocab"].items():
        if i == token_id:
            return token
    raise ValueError(f"{tokenizer_file}: no token with id {token_id}")
