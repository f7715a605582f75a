"""Token shard format: dtype choice, EOT after every document, offsets, shard roll-over, readers."""

import numpy as np
import pytest

from storage.artifact import ArtifactError, Store
from storage.tokens import TokenShard, TokenShardWriter, open_split, read_spans, shard_names, token_dtype

EOT = 0


def _docs(n, vocab, seed=0, max_len=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


def _write(tmp_path, docs, vocab, max_tokens=1 << 20, batch=7):
    w = TokenShardWriter(tmp_path, "train", vocab, EOT, max_tokens)
    placed = []
    for i in range(0, len(docs), batch):
        placed += w.add(docs[i : i + batch])
    return placed, w.close()


def _shard(tmp_path, info, vocab):
    return TokenShard(tmp_path / info.bin, tmp_path / info.idx, token_dtype(vocab))


def test_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(200_000) == np.dtype("<u4")
    with pytest.raises(ValueError):
        token_dtype(0)


@pytest.mark.parametrize("vocab", [8192, 100_000])
def test_documents_round_trip_with_eot_and_consistent_offsets(tmp_path, vocab):
    docs = _docs(200, vocab)
    if vocab > 65536:
        docs[3] = [65535, 65536, 99_999]  # ids that uint16 would wrap
    placed, shards = _write(tmp_path, docs, vocab)
    assert len(shards) == 1 and shards[0].n_docs == 200
    info = shards[0]
    itemsize = 2 if vocab <= 65536 else 4
    assert (tmp_path / info.bin).stat().st_size == info.n_tokens * itemsize
    assert (tmp_path / info.idx).stat().st_size == (info.n_docs + 1) * 8

    shard = _shard(tmp_path, info, vocab)
    assert shard.n_docs == 200 and shard.n_tokens == sum(len(d) + 1 for d in docs)
    offsets = np.asarray(shard.offsets)
    assert offsets[0] == 0 and offsets[-1] == shard.n_tokens
    for i, (doc, (name, start, n)) in enumerate(zip(docs, placed)):
        assert name == info.bin
        assert start == offsets[i] and n == offsets[i + 1] - offsets[i] == len(doc) + 1
        assert shard.doc(i).tolist() == doc + [EOT]
        assert shard.span(start, n).tolist() == doc + [EOT]
    assert shard.doc(3).tolist() == docs[3] + [EOT]


def test_shards_roll_over_without_splitting_documents(tmp_path):
    docs = [[5] * 9 for _ in range(25)]  # 10 tokens each with EOT
    docs[10] = [7] * 99  # 100 tokens: longer than a shard, gets its own
    placed, shards = _write(tmp_path, docs, 1000, max_tokens=35, batch=4)
    assert [s.n_docs for s in shards] == [3, 3, 3, 1, 1, 3, 3, 3, 3, 2]
    assert [s.bin for s in shards] == [shard_names("train", i)[0] for i in range(10)]
    assert all(s.n_tokens <= 35 for s in shards if s.n_docs > 1)
    by_name = {s.bin: _shard(tmp_path, s, 1000) for s in shards}
    for doc, (name, start, n) in zip(docs, placed):
        assert by_name[name].span(start, n).tolist() == doc + [EOT]
    assert sum(s.n_docs for s in by_name.values()) == 25


def test_out_of_vocabulary_id_is_refused(tmp_path):
    w = TokenShardWriter(tmp_path, "train", 1000, EOT)
    with pytest.raises(ValueError, match="token id 1000"):
        w.add([[1, 2, 1000]])
    with pytest.raises(ValueError, match="eot_id"):
        TokenShardWriter(tmp_path, "train", 1000, 1000)


def test_a_split_without_documents_writes_no_shard(tmp_path):
    w = TokenShardWriter(tmp_path, "val", 1000, EOT)
    assert w.add([]) == []
    assert w.close() == []
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_an_index_that_does_not_match(tmp_path):
    _, shards = _write(tmp_path, _docs(20, 500), 500)
    for wrong in ("uint32", "uint64"):
        with pytest.raises(ArtifactError, match="dtype"):
            TokenShard(tmp_path / shards[0].bin, tmp_path / shards[0].idx, wrong)


def test_open_split_and_read_spans_from_a_published_artifact(tmp_path):
    store = Store(tmp_path / "store")
    train, val = _docs(50, 3000, seed=1), _docs(10, 3000, seed=2)
    with store.writer("shards", "k") as w:
        placed = {}
        for split, docs in (("train", train), ("val", val)):
            tw = TokenShardWriter(w.dir, split, 3000, EOT, max_tokens=300)
            placed[split] = tw.add(docs)
            for info in tw.close():
                w.set_rows(info.bin, info.n_docs)
        w.meta["dtype"] = token_dtype(3000).name
    m = w.manifest
    store.verify(m)
    train_shards = open_split(m, "train")
    assert len(train_shards) > 1
    assert [d.tolist() for s in train_shards for d in (s.doc(i) for i in range(s.n_docs))] == [d + [EOT] for d in train]
    assert sum(s.n_docs for s in open_split(m, "val")) == 10
    assert open_split(m, "test") == []
    spans = [(m.path(name), start, n) for name, start, n in placed["val"]]
    assert [a.tolist() for a in read_spans(spans, m.meta["dtype"])] == [d + [EOT] for d in val]
    with pytest.raises(IndexError):
        list(read_spans([(spans[0][0], 0, 10**6)], "uint16"))
