"""Continuous batching gives every request exactly the tokens it would get alone, on either batch cache."""

import copy

import numpy as np
import pytest
import torch

from model.batching import ContinuousBatcher, GenerationRequest, PaddedCache
from model.export import export_onnx
from model.generate import generate
from model.onnx_generate import OnnxLM, ServingGraph
from model.serving_graph import save_serving_graph
from model.torch_lm import TorchLM
from tests.model.tiny import EOT, build_tokenizer, train_tiny


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    eot = tok.token_to_id(EOT)
    return train_tiny(tok, eot), tok, eot


@pytest.fixture(scope="module")
def serving(tiny, tmp_path_factory):
    """The tiny model's serving graph (fp32), KV cache updated in place."""
    model = tiny[0]
    out = tmp_path_factory.mktemp("serving")
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return ServingGraph(save_serving_graph(weights, model.config.to_dict(), out), threads=1)


def batcher(model, eot, cache=None, **kw) -> ContinuousBatcher:
    """The batcher over ``cache``; by default torch's (the GPU serving backend, here on CPU in fp32)."""
    if cache is None:
        lm = TorchLM(model)
        cache = PaddedCache(lm, lm.ops)
    return ContinuousBatcher(cache, model.config.block_size, eot, **kw)


CACHES = ["torch", "serving"]


def cache_of(kind: str, serving: ServingGraph, rows: int = 16):
    """A fresh batch cache of ``kind``: torch's padded one (None: :func:`batcher`'s default) or the serving graph's."""
    return None if kind == "torch" else serving.cache(rows)


PROMPTS = ["the cat", "a dog ran to the", "the mat. a", "park", "the cat sat on the mat. a dog"]


def requests(tok, eot, **kw) -> list[GenerationRequest]:
    return [GenerationRequest([eot] + tok.encode(p).ids, max_new_tokens=6 + 3 * i, **kw) for i, p in enumerate(PROMPTS)]


def run(b: ContinuousBatcher, reqs, join_every: int = 2) -> tuple[list, list[int]]:
    """Submit one request every ``join_every`` steps; run to the end; the generations and batch sizes seen."""
    pending, gens, sizes = list(reqs), [], []
    steps = 0
    while pending or b.active:
        if pending and steps % join_every == 0:
            gens.append(b.submit(pending.pop(0)))
        b.step()
        sizes.append(len(b.running))
        steps += 1
        assert steps < 500
    return gens, sizes


@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)])
def test_batched_tokens_equal_single_request_tokens(tiny, serving, kind, sampling):
    model, tok, eot = tiny
    reqs = requests(tok, eot, **sampling)
    gens, sizes = run(batcher(model, eot, cache_of(kind, serving)), reqs)
    assert max(sizes) >= 3  # requests really shared decode steps
    for req, gen in zip(reqs, gens):
        alone = generate(
            model,
            req.prompt_ids,
            req.max_new_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            eot_id=eot,
            seed=req.seed,
        )
        assert gen.tokens == alone and gen.finish_reason in ("length", "stop")


@pytest.mark.parametrize("kind", CACHES)
def test_a_cancelled_request_leaves_and_the_others_are_unchanged(tiny, serving, kind):
    model, tok, eot = tiny
    reqs = requests(tok, eot, temperature=0.0)
    b = batcher(model, eot, cache_of(kind, serving))
    gens = [b.submit(r) for r in reqs]
    b.step()
    b.step()
    b.step()
    assert len(b.running) == 5
    b.cancel(gens[1])
    events = b.step()
    assert (gens[1], None) in events and gens[1] not in b.running and len(b.running) == 4
    while b.active:
        b.step()
    assert gens[1].finish_reason == "cancelled"
    for req, gen in zip(reqs, gens):
        if gen is not gens[1]:
            assert gen.tokens == generate(model, req.prompt_ids, req.max_new_tokens, temperature=0.0, eot_id=eot)


def test_the_batch_cache_shrinks_when_its_longest_member_leaves(tiny):
    model, tok, eot = tiny
    b = batcher(model, eot, max_prefills=4)
    long = b.submit(GenerationRequest([eot] + tok.encode("the cat sat on the mat. a dog ran").ids, 3, 0.0))
    short = b.submit(GenerationRequest([eot] + tok.encode("the").ids, 8, 0.0))
    b.step()  # both prefilled, then one decode step together
    cache = b.cache
    assert cache._k[0].shape[2] == long.prompt_tokens + 1  # padded to the longest history
    assert cache._mask.sum(axis=1).tolist() == [long.prompt_tokens + 1, short.prompt_tokens + 1]
    while not long.done:
        b.step()
    assert b.running == [short] and cache._k[0].shape[2] == short.prompt_tokens + len(short.tokens) - 1
    assert cache._mask.all()


def test_the_serving_cache_refills_a_freed_slot_with_the_last_row(tiny, serving):
    """Rows stay the buffer's first slots: a row that leaves is replaced by the last one, its cache moved."""
    model, tok, eot = tiny
    cache = serving.cache(8)
    prompts = [[eot] + tok.encode(p).ids for p in PROMPTS[:4]]
    for ids in prompts:
        cache.add(ids)
    assert cache.rows == 4 and cache.lengths[:4].tolist() == [len(p) for p in prompts]
    kept = [buf[3, :, : len(prompts[3])].copy() for buf in cache._buffers]
    assert cache.drop([1]) == [0, 3, 2]
    assert cache.rows == 3 and cache.lengths[:3].tolist() == [len(prompts[i]) for i in (0, 3, 2)]
    assert all(np.array_equal(buf[1, :, : len(prompts[3])], k) for buf, k in zip(cache._buffers, kept))
    assert cache.drop([2, 0]) == [1] and cache.lengths[0] == len(prompts[3])  # row 1 (prompt 3) moved to slot 0
    logits = cache.decode(np.asarray([[5]]))
    with torch.no_grad():
        want = model(torch.tensor([prompts[3] + [5]]))[0][0, -1].numpy()
    assert np.abs(logits[0] - want).max() < 1e-4


def test_the_serving_cache_grows_to_its_row_limit_and_no_further(tiny, serving):
    model, tok, eot = tiny
    cache = serving.cache(6)
    for i in range(6):
        cache.add([eot, 3 + i])
    assert len(cache._buffers[0]) == 6 and cache.rows == 6
    with pytest.raises(RuntimeError, match="6 rows"):
        cache.add([eot, 3])


def test_max_batch_holds_the_rest_in_the_queue(tiny):
    model, tok, eot = tiny
    b = batcher(model, eot, max_batch=2, max_prefills=4)
    for r in requests(tok, eot, temperature=0.0):
        b.submit(r)
    b.step()
    assert len(b.running) == 2 and len(b.waiting) == 3


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="top_p"):
        GenerationRequest([0], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationRequest([0], 4, temperature=-1.0)


def test_the_exported_graph_takes_left_padded_batches(tiny, tmp_path):
    """ONNX with past_mask computes what torch computes, row by row, for rows of different histories."""
    model, tok, eot = tiny
    lm = OnnxLM(export_onnx(model, tmp_path), threads=1)
    c = model.config
    b = ContinuousBatcher(PaddedCache(lm), c.block_size, eot)
    reqs = requests(tok, eot, temperature=0.0)
    gens, sizes = run(b, reqs)
    assert max(sizes) >= 3
    for req, gen in zip(reqs, gens):
        assert gen.tokens == generate(model, req.prompt_ids, req.max_new_tokens, temperature=0.0, eot_id=eot)
    ids = np.asarray([[3], [5]])
    past = np.random.default_rng(0).normal(size=(c.n_layer, 2, c.n_head, 4, c.head_dim)).astype(np.float32)
    mask = np.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        want = model.forward_cached(
            torch.from_numpy(ids), torch.from_numpy(past), torch.from_numpy(past), torch.from_numpy(mask)
        )
    got = lm(ids, list(past), list(past), mask)
    assert np.abs(got[0] - want[0].numpy()).max() < 1e-4
    assert all(np.abs(g - w.numpy()).max() < 1e-4 for g, w in zip(got[1] + got[2], want[1] + want[2]))


class _StackedCacheStep(torch.nn.Module):
    """The graph as exports before the per-layer layout had it: one (L, B, H, P, hd) cache tensor each."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, past_key, past_value, past_mask):
        logits, ks, vs = self.gpt.forward_cached(input_ids, past_key, past_value, past_mask)
        return logits, torch.stack(ks), torch.stack(vs)


def test_an_export_with_the_older_stacked_cache_still_serves(tiny, tmp_path):
    """A store's promoted model may be an export from before the per-layer layout: it still loads and batches."""
    model, tok, eot = tiny
    c = model.config
    gpt = copy.deepcopy(model).eval()
    gpt.lm_head.weight = torch.nn.Parameter(gpt.lm_head.weight.detach().clone())
    batch, past = torch.export.Dim("batch", min=1), torch.export.Dim("past", min=0, max=c.block_size - 1)
    cache = torch.zeros(c.n_layer, 2, c.n_head, 2, c.head_dim)
    path = tmp_path / "stacked.onnx"
    torch.onnx.export(
        _StackedCacheStep(gpt).eval(),
        (torch.zeros((2, 2), dtype=torch.long), cache, cache.clone(), torch.ones((2, 2), dtype=torch.long)),
        str(path),
        input_names=["input_ids", "past_key", "past_value", "past_mask"],
        output_names=["logits", "present_key", "present_value"],
        dynamic_shapes={
            "input_ids": {0: batch, 1: torch.export.Dim("seq", min=1, max=c.block_size)},
            "past_key": {1: batch, 3: past},
            "past_value": {1: batch, 3: past},
            "past_mask": {0: batch, 1: past},
        },
        dynamo=True,
    )
    lm = OnnxLM(path, threads=1)
    assert lm.stacked and lm.cache_dims == (c.n_layer, c.n_head, c.head_dim)
    reqs = requests(tok, eot, temperature=0.0)
    gens, sizes = run(ContinuousBatcher(PaddedCache(lm), c.block_size, eot), reqs)
    assert max(sizes) >= 3
    for req, gen in zip(reqs, gens):
        assert gen.tokens == generate(model, req.prompt_ids, req.max_new_tokens, temperature=0.0, eot_id=eot)
