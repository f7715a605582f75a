"""The stage helpers: keys by content, reuse of published artifacts, errors that survive pickling."""

import pickle

import pyarrow as pa
import pytest
from pydantic import Field

from storage.artifact import Store
from tasks.common import FAIL_STAGE_ENV, FAIL_STAGE_FILE_ENV, StageConfig, StageError, begin, stage_key


class _Cfg(StageConfig):
    n: int = Field(1, description="a number")


def _publish(store, stage, cfg, **inputs):
    b = begin(store, stage, "v1", cfg, **inputs)
    if b.done:
        return b.done
    with store.writer(stage, b.key, parents=b.parents, config=b.config, code_version="v1") as w:
        w.write_table(pa.table({"n": [cfg.n]}))
    return w.manifest


def test_begin_reuses_a_published_artifact_and_keys_follow_inputs(tmp_path):
    store = Store(tmp_path)
    first = _publish(store, "a", _Cfg(n=1))
    again = begin(store, "a", "v1", _Cfg(n=1))
    assert again.done is not None and again.done.key == first.key
    assert begin(store, "a", "v1", _Cfg(n=2)).done is None
    assert begin(store, "a", "v2", _Cfg(n=1)).done is None
    child = _publish(store, "b", _Cfg(), docs=first)
    assert child.parents == [first.ref]
    other_parent = _publish(store, "a", _Cfg(n=3))
    assert stage_key("b", "v1", _Cfg(), {"docs": other_parent}) != child.key


def test_missing_parent_is_a_stage_error(tmp_path):
    store = Store(tmp_path)
    parent = _publish(store, "a", _Cfg())
    (parent.dir / "manifest.json").unlink()
    with pytest.raises(StageError, match=r"\[b\] a/.*input artifact is missing"):
        begin(store, "b", "v1", _Cfg(), docs=parent)


def test_injected_failure_names_the_switch(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_STAGE_ENV, "a")
    with pytest.raises(StageError, match="failure injected"):
        begin(Store(tmp_path), "a", "v1", _Cfg())


def test_failure_file_fails_only_the_named_stage_while_it_exists(tmp_path, monkeypatch):
    switch = tmp_path / "fail-stage"
    monkeypatch.setenv(FAIL_STAGE_FILE_ENV, str(switch))
    store = Store(tmp_path / "store")
    begin(store, "a", "v1", _Cfg())  # no file yet: runs
    switch.write_text("a\n")
    with pytest.raises(StageError, match=f"{switch}: failure injected"):
        begin(store, "a", "v1", _Cfg())
    begin(store, "b", "v1", _Cfg())  # another stage is not affected
    switch.unlink()
    assert begin(store, "a", "v1", _Cfg()).done is None


def test_stage_error_round_trips_through_pickle():
    e = StageError("filter", "docs/abc", "every document was dropped", "relax filter.languages")
    back = pickle.loads(pickle.dumps(e))
    assert (back.stage, back.input, back.reason, back.hint) == (e.stage, e.input, e.reason, e.hint)
    assert str(back) == str(e) == "[filter] docs/abc: every document was dropped (relax filter.languages)"
