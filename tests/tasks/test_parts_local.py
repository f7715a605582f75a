"""The local engine: what a step raises in a worker comes back to the stage, named, whatever its class."""

import logging

import pytest

from tasks.parts.core import Execution, Part
from tasks.parts.partmap import PartMap
from tasks.stage import StageError


class Unrebuildable(Exception):
    """Pickles (args is one string), but cannot be rebuilt from it: its __init__ wants two."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def failing_step(part, out, bad_index):
    if part.index == bad_index:
        raise Unrebuildable(part.name, "cannot be read")
    return {"rows": part.rows}


def test_an_exception_that_cannot_be_rebuilt_still_names_the_part(tmp_path):
    parts = [Part(i, f"f{i}.warc", str(tmp_path / f"f{i}.warc"), 0, i) for i in range(3)]
    with PartMap("ingest", tmp_path / "work", execution=Execution(workers=2), log=logging.getLogger("t")) as pm:
        with pytest.raises(
            StageError, match=r"\[ingest\] f1.warc \(.*f1.warc\): read failed: .*Unrebuildable: f1.warc: cannot be read"
        ):
            pm.map("read", failing_step, parts, 1)
    with PartMap("ingest", tmp_path / "work", execution=Execution(workers=2), log=logging.getLogger("t")) as pm:
        assert pm.map("read", failing_step, parts, -1) == [{"rows": 0}, {"rows": 1}, {"rows": 2}]
