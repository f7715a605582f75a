"""Cache records are plain JSON naming an artifact: a planted pickle never runs."""

import json
import pickle
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import get_current_settings

from flows.records import run_stage
from storage.artifact import Store
from tasks import extract
from tasks.cache_records import RECORD_SERIALIZER, RecordRefused, check_record
from tasks.text.html import ExtractConfig
from tests.stages import one_page_ingest


def record(result: str, serializer: dict | None = None) -> bytes:
    return json.dumps(
        {"metadata": {"serializer": serializer or RECORD_SERIALIZER.model_dump(mode="json")}, "result": result}
    ).encode()


def test_a_reference_or_null_passes():
    assert check_record(record('{"stage": "extract", "key": "abc"}'))
    assert check_record(record("null"))


@pytest.mark.parametrize(
    "content",
    [
        record('{"stage": "extract", "key": "abc"}', {"type": "pickle", "picklelib": "cloudpickle"}),
        record("{}", {**RECORD_SERIALIZER.model_dump(mode="json"), "object_decoder": "os.system"}),
        record('{"__class__": "subprocess.Popen", "data": ["id"]}'),
        record('{"stage": "extract", "key": 3}'),
        record('{"stage": "extract", "key": "k", "extra": "x"}'),
        record("not json"),
        b"\x80\x04garbage",
        b'{"result": "null"}',
    ],
    ids=["pickle", "decoder-hook", "class-hook", "not-a-string", "extra-field", "bad-result", "binary", "no-metadata"],
)
def test_anything_else_is_refused(content):
    with pytest.raises(RecordRefused):
        check_record(content)


class Planted:
    """Unpickling this creates a file: the proof that a record was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
def test_a_planted_pickle_record_is_never_unpickled(tmp_path):
    store = Store(tmp_path / "store")
    raw = one_page_ingest(store)
    cfg = ExtractConfig(workers=1)

    @flow
    def once() -> dict:
        records = {}
        run_stage(records, "extract", extract.task, store=store, cfg=cfg, raw=raw)
        return records["extract"].to_dict()

    first = once()
    assert first["status"] == "Completed" and first["docs_out"] == 1
    path = Path(get_current_settings().results.local_storage_path) / extract.STAGE.cache_key(
        store, cfg, raw=raw, allow_empty=False
    )
    written = json.loads(path.read_bytes())
    assert json.loads(written["result"]) == {"stage": "extract", "key": first["artifact"].split("/")[1]}
    assert once()["status"] == "Cached"

    # Someone with write access to the store plants a record that Prefect would unpickle.
    marker = tmp_path / "pwned"
    written["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle"}
    written["result"] = __import__("base64").b64encode(pickle.dumps(Planted(str(marker)))).decode()
    path.write_text(json.dumps(written))

    again = once()
    assert not marker.exists()
    assert again["status"] == "Completed" and again["artifact"] == first["artifact"] and again["docs_out"] == 1
    assert json.loads(json.loads(path.read_bytes())["result"]) == {"stage": "extract", "key": again["artifact"][8:]}
