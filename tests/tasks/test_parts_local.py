"""The local engine: what a step raises in a worker comes back to the stage, named, whatever its class;
its workers' library thread pools share the cores."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.parts.core import THREAD_POOLS, Execution, Part, default_workers
from tasks.parts.partmap import PartMap
from tasks.stage import StageError

ROOT = Path(__file__).resolve().parents[2]  # the project, where a child Python finds its modules


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


def thread_pools(part, out):
    import pyarrow

    return {**{var: os.environ.get(var) for var in THREAD_POOLS}, "pyarrow": pyarrow.cpu_count()}


def test_workers_size_their_thread_pools_to_their_share_of_the_cores(tmp_path):
    parts = [Part(i, f"p{i}", str(tmp_path / f"p{i}"), 0, 1) for i in range(4)]
    share = max(1, default_workers() // 2)
    with PartMap("shards", tmp_path / "work", execution=Execution(workers=2), log=logging.getLogger("t")) as pm:
        seen = pm.map("encode", thread_pools, parts)
    # A variable set by the user (OpenMP's by conftest.py; rayon's, if this environment has it) is kept.
    want = {var: os.environ.get(var, str(share)) for var in THREAD_POOLS} | {"pyarrow": share}
    assert seen == [want] * 4


def log_start(part, out, log_file):
    with open(log_file, "a") as f:
        f.write(f"{part.index}\n")
    return part.bytes


def test_a_map_starts_its_biggest_parts_first_and_returns_results_in_part_order(tmp_path):
    sizes = [10, 300, 20, 300, 5000]
    parts = [Part(i, f"p{i}", str(tmp_path / f"p{i}"), 0, 1, size) for i, size in enumerate(sizes)]
    log_file = tmp_path / "started"
    # One worker process (isolate: not this process) takes the parts one at a time: its order is the map's.
    with PartMap("extract", tmp_path / "work", execution=Execution(workers=1), log=logging.getLogger("t")) as pm:
        assert pm.map("text", log_start, parts, str(log_file), isolate=True) == sizes
    assert log_file.read_text().split() == ["4", "1", "3", "2", "0"]  # equal sizes keep their order


def test_warm_up_starts_the_fork_server_only_for_local_workers():
    """A stage calls warm_up before it plans its parts; with more than one local worker the fork
    server (and its imports) starts then, in the background; one worker runs in-process: nothing starts."""
    code = (
        "import psutil; from tasks.parts.core import Execution; from tasks.parts.partmap import warm_up;"
        "warm_up(Execution(workers=1)); assert psutil.Process().children() == [];"
        "warm_up(Execution(workers=2)); warm_up(Execution(workers=2));"
        "lines = [' '.join(k.cmdline()) for k in psutil.Process().children()];"
        "assert sum('forkserver' in line for line in lines) == 1, lines"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def main_seen(part, out):
    """What a worker sees of its parent's main script: did the script's own imports run here?"""
    return "marker_of_main" in sys.modules


MAIN = """
import logging, sys
from pathlib import Path
import marker_of_main  # the main script's own imports: under Prefect, all of prefect
if __name__ == "__main__":
    from tasks.parts.core import Execution, Part
    from tasks.parts.partmap import PartMap
    from tests.tasks.test_parts_local import main_seen
    parts = [Part(i, f"p{i}", f"p{i}", 0, 1) for i in range(2)]
    with PartMap("x", Path(sys.argv[1]), execution=Execution(workers=2), log=logging.getLogger("t")) as pm:
        print(pm.map("probe", main_seen, parts))
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_workers_do_not_run_the_parents_main_module(tmp_path, how):
    """A deployment's flow run is `python -m prefect.engine` or the `prefect` script: workers skip its imports."""
    (tmp_path / "marker_of_main.py").write_text("")
    (tmp_path / "parent_main.py").write_text(MAIN)
    run = ["parent_main.py"] if how == "script" else ["-m", "parent_main"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    done = subprocess.run(
        [sys.executable, *run, str(tmp_path / "work")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False, False]"
