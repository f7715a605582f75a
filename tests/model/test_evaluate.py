"""Held-out scoring: bits per byte on hand-checkable cases, every token scored once, backends agree."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.evaluate import EvalDoc, evaluate_documents, evaluate_logits_fn, score_documents, unigram_bits_per_byte
from model.gpt import GPT

EOT = 0


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_model(vocab: int = 40, block: int = 8) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16)).eval()


def test_uniform_logits_give_log2_vocab_bits_per_token_over_bytes_per_token():
    vocab = 64
    docs = [EvalDoc(np.arange(1, 11), n_bytes=20, group="en"), EvalDoc(np.arange(5, 35), n_bytes=30, group="de")]
    out = evaluate_logits_fn(lambda x: np.zeros((*x.shape, vocab)), docs, EOT, block_size=8)
    # 40 tokens at 6 bits each over 50 bytes
    assert out["bits_per_byte"] == pytest.approx(40 * 6 / 50)
    assert out["loss"] == pytest.approx(math.log(64)) and out["perplexity"] == pytest.approx(64)
    assert out["tokens"] == 40 and out["bytes"] == 50 and out["documents"] == 2
    assert out["by_group"]["en"]["bits_per_byte"] == pytest.approx(10 * 6 / 20)
    assert out["by_group"]["de"]["bits_per_byte"] == pytest.approx(30 * 6 / 30)


def test_a_model_with_a_zero_head_is_uniform_too():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the embedding is zero as well, logits are all 0
    docs = [EvalDoc(np.arange(1, 20), n_bytes=38)]
    assert evaluate_documents(model, docs, EOT)["bits_per_byte"] == pytest.approx(19 * math.log2(40) / 38)


@pytest.mark.parametrize("block_size", [1, 3, 8, 100])
def test_every_token_is_scored_once_and_documents_start_after_eot(block_size):
    seen_targets, first_inputs = [], []

    def nll(x, y):
        seen_targets.append(y.copy())
        first_inputs.extend(x[:, 0].tolist())
        return np.ones(x.shape)

    docs = [
        EvalDoc(np.arange(1, 18), 17),
        EvalDoc(np.array([7]), 1),
        EvalDoc(np.array([], dtype=np.int64), 0),
        EvalDoc(np.arange(20, 29), 9),
    ]
    out = score_documents(nll, docs, EOT, block_size, batch_size=2)
    assert out["tokens"] == 27 and out["loss"] == pytest.approx(1.0) and out["documents"] == 3
    targets = np.concatenate([t.ravel() for t in seen_targets])
    assert sorted(targets[targets > 0].tolist()) == sorted(list(range(1, 18)) + [7] + list(range(20, 29)))
    assert first_inputs.count(EOT) >= 3  # each non-empty document's first window starts at EOT


def test_torch_and_logits_fn_paths_agree_and_match_cross_entropy_by_hand():
    model = tiny_model(block=8)
    doc = np.array([3, 9, 4, 4, 17, 2, 5, 30, 11, 6, 0])  # 11 tokens, ends with EOT: two windows of <= 8
    out = evaluate_documents(model, [EvalDoc(doc, 25)], EOT, batch_size=1)
    seq = torch.tensor([EOT, *doc])
    with torch.no_grad():
        # windows: inputs seq[0:8] -> targets seq[1:9], inputs seq[8:11] -> targets seq[9:12]
        nats = sum(
            F.cross_entropy(model(seq[None, a:b])[0][0], seq[a + 1 : b + 1], reduction="sum").item()
            for a, b in ((0, 8), (8, 11))
        )
    assert out["loss"] == pytest.approx(nats / 11, rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nats / (math.log(2) * 25), rel=1e-6)

    def logits_fn(x):
        with torch.no_grad():
            return model(torch.from_numpy(x))[0].numpy()

    docs = [EvalDoc(doc, 25, "a"), EvalDoc(doc[:5], 9, "b"), EvalDoc(np.arange(1, 30), 40, "a")]
    via_torch = evaluate_documents(model, docs, EOT, batch_size=2)
    via_fn = evaluate_logits_fn(logits_fn, docs, EOT, block_size=8, batch_size=3)
    assert via_fn["loss"] == pytest.approx(via_torch["loss"], rel=1e-6)
    for g in ("a", "b"):
        assert via_fn["by_group"][g]["bits_per_byte"] == pytest.approx(
            via_torch["by_group"][g]["bits_per_byte"], rel=1e-6
        )
    assert not model.training


def test_unigram_baseline_on_hand_checkable_counts():
    docs = [EvalDoc(np.array([1, 1, 2, 2]), 4), EvalDoc(np.array([1, 2, 1, 2]), 4)]
    assert unigram_bits_per_byte(docs) == pytest.approx(1.0)  # p = 1/2 each: 8 bits over 8 bytes
    counts = np.array([0, 3, 1, 0])  # add-one: p(1) = 4/8, p(2) = 2/8
    assert unigram_bits_per_byte(docs, counts) == pytest.approx((4 * 1 + 4 * 2) / 8)
    with pytest.raises(ValueError, match="outside counts"):
        unigram_bits_per_byte(docs, np.array([1, 1]))


def test_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_logits_fn(lambda x: np.zeros((*x.shape, 4)), [EvalDoc(np.array([], dtype=np.int64), 0)], EOT, 8)
