"""The stage contract: keys by content (parents, config, code, external inputs), reuse of
published artifacts, the input checks, errors that survive pickling."""

import pickle

import pyarrow as pa
import pytest
from pydantic import Field

from storage.artifact import Store
from tasks.stage import FAIL_STAGE_ENV, FAIL_STAGE_FILE_ENV, Stage, StageConfig, StageError, require_columns


class _Cfg(StageConfig):
    n: int = Field(1, description="a number")


A = Stage("a", "tasks.extract")  # any module of the project gives a stage its code version
B = Stage("b", "tasks.extract")


def _publish(store, stage, cfg, **inputs):
    b = stage.begin(store, cfg, **inputs)
    if b.done:
        return b.done
    with stage.writer(store, b) as w:
        w.write_table(pa.table({"n": [cfg.n]}))
    return w.manifest


def test_begin_reuses_a_published_artifact_and_keys_follow_inputs(tmp_path):
    store = Store(tmp_path)
    first = _publish(store, A, _Cfg(n=1))
    again = A.begin(store, _Cfg(n=1))
    assert again.done is not None and again.done.key == first.key
    assert A.begin(store, _Cfg(n=2)).done is None
    assert Stage("a", "tasks.dedup").begin(store, _Cfg(n=1)).done is None  # other code, other key
    child = _publish(store, B, _Cfg(), docs=first)
    assert child.parents == [first.ref]
    assert child.code_version == B.code_version
    other_parent = _publish(store, A, _Cfg(n=3))
    assert B.key(_Cfg(), docs=other_parent) != child.key
    assert (
        B.key(_Cfg(), docs=first, store=Store(tmp_path / "elsewhere")) == child.key
    )  # where it is written is not an input


def test_external_inputs_are_part_of_the_key(tmp_path):
    seen = {"value": "v1"}
    stage = Stage("c", "tasks.extract", external=lambda cfg, **inputs: seen["value"])
    before = stage.key(_Cfg())
    assert stage.key(_Cfg()) == before
    seen["value"] = "v2"
    assert stage.key(_Cfg()) != before


def test_cache_key_is_the_artifact_key_in_its_store(tmp_path):
    key = A.key(_Cfg())
    here, there = A.cache_key(Store(tmp_path / "x"), _Cfg()), A.cache_key(Store(tmp_path / "y"), _Cfg())
    assert key in here and key in there and here != there


def test_missing_parent_is_a_stage_error(tmp_path):
    store = Store(tmp_path)
    parent = _publish(store, A, _Cfg())
    (parent.dir / "manifest.json").unlink()
    with pytest.raises(StageError, match=r"\[b\] a/.*input artifact is missing"):
        B.begin(store, _Cfg(), docs=parent)


def test_injected_failure_names_the_switch(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_STAGE_ENV, "a")
    with pytest.raises(StageError, match="failure injected"):
        A.begin(Store(tmp_path), _Cfg())


def test_failure_file_fails_only_the_named_stage_while_it_exists(tmp_path, monkeypatch):
    switch = tmp_path / "fail-stage"
    monkeypatch.setenv(FAIL_STAGE_FILE_ENV, str(switch))
    store = Store(tmp_path / "store")
    A.begin(store, _Cfg())  # no file yet: runs
    switch.write_text("a\n")
    with pytest.raises(StageError, match=f"{switch}: failure injected"):
        A.begin(store, _Cfg())
    B.begin(store, _Cfg())  # another stage is not affected
    switch.unlink()
    assert A.begin(store, _Cfg()).done is None


def test_require_columns_names_what_is_wrong(tmp_path):
    store = Store(tmp_path)
    with store.writer("x", "docs") as w:
        w.write_table(pa.table({"doc_id": ["a"], "text": ["t"], "lang": ["en"]}))
    docs = w.manifest
    assert require_columns("s", docs, ["doc_id", "text"]) == {"doc_id", "text", "lang"}
    with pytest.raises(StageError, match=r"\[s\] x/docs: documents lack column\(s\) \['url'\]"):
        require_columns("s", docs, ["url"])
    with pytest.raises(
        StageError, match=r"documents already have \['lang'\].*feed s the output of the dedup stage, not its own"
    ):
        require_columns("s", docs, ["text"], absent=("lang",), upstream="the dedup stage")
    with store.writer("x", "empty") as w:
        w.write_table(pa.table({"doc_id": ["a"]}), "dropped")
    with pytest.raises(StageError, match="no documents"):
        require_columns("s", w.manifest, ["text"])
    assert require_columns("s", w.manifest, ["text"], allow_empty=True) == set()


def test_stage_error_round_trips_through_pickle():
    e = StageError("filter", "docs/abc", "every document was dropped", "relax filter.languages")
    back = pickle.loads(pickle.dumps(e))
    assert (back.stage, back.input, back.reason, back.hint) == (e.stage, e.input, e.reason, e.hint)
    assert str(back) == str(e) == "[filter] docs/abc: every document was dropped (relax filter.languages)"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


def test_a_tampered_input_is_refused_naming_it(tmp_path):
    store = Store(tmp_path)
    parent = _publish(store, A, _Cfg())
    _flip_a_byte(parent.path("part-00000.parquet"))
    with pytest.raises(
        StageError, match=r"\[b\] a/\w+: input artifact does not verify: .*part-00000.parquet does not match"
    ):
        B.begin(store, _Cfg(), docs=parent)


def test_a_damaged_published_artifact_is_moved_aside_and_built_again(tmp_path):
    store = Store(tmp_path)
    first = _publish(store, A, _Cfg())
    _flip_a_byte(first.path("part-00000.parquet"))
    again = A.begin(store, _Cfg())
    assert again.done is None and again.key == first.key  # not served: built again under the same key
    (aside,) = (tmp_path / "a").glob(f".damaged-{first.key}-*")
    assert (aside / "manifest.json").exists()
    rebuilt = _publish(store, A, _Cfg())
    store.verify(rebuilt)
    assert rebuilt.digest() == first.digest()  # the same content, so what was built from it stays valid
