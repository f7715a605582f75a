"""Torch generation: the KV-cache path equals recomputing everything; sampling rules and stops."""

from collections import Counter

import numpy as np
import pytest
import torch

from model.config import GPTConfig
from model.decoding import fit_prompt, sample_token
from model.generate import generate
from model.gpt import GPT


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32))


def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_uncached_greedy(model):
    model.eval()
    prompt = [3, 17, 4, 9, 21]
    assert generate(model, prompt, 15, temperature=0) == greedy_without_cache(model, prompt, 15)


def test_stops_at_eot_and_restores_training_mode(model):
    model.train()
    first = generate(model, [1, 2, 3], 5, temperature=0)[0]
    assert generate(model, [1, 2, 3], 5, temperature=0, eot_id=first) == []
    assert model.training


def test_stops_when_the_context_window_is_full(model):
    assert len(generate(model, [1, 2, 3], 100, temperature=0)) == 24 - 3 + 1
    long_prompt = list(range(1, 41))
    assert fit_prompt(long_prompt, 24, 100) == long_prompt[-13:]  # room for 12 = block_size // 2 new tokens
    assert len(generate(model, long_prompt, 100, temperature=0)) == 12
    assert fit_prompt(long_prompt, 24, 5) == long_prompt[-20:]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    a = generate(model, [5, 6], 12, temperature=1.5, seed=7)
    assert a == generate(model, [5, 6], 12, temperature=1.5, seed=7)
    assert a != generate(model, [5, 6], 12, temperature=1.5, seed=8)
    greedy = generate(model, [5, 6], 12, temperature=0)
    assert generate(model, [5, 6], 12, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, [5, 6], 12, temperature=1.0, top_p=1e-6, seed=1) == greedy


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert set(Counter(sample_token(logits, 1.0, 2, 1.0, rng) for _ in range(300))) == {0, 1}
    assert set(Counter(sample_token(logits, 1.0, 0, 0.7, rng) for _ in range(300))) == {0, 1}
    assert set(Counter(sample_token(logits, 1.0, 0, 0.81, rng) for _ in range(300))) == {0, 1, 2}
    assert sample_token(logits, 0.0, 0, 1.0, rng) == 0


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"max_new_tokens": -1}])
def test_bad_settings_are_rejected(model, kwargs):
    with pytest.raises(ValueError):
        generate(model, [1], **kwargs)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)
