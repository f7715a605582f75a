"""lmforge gc: what no artifact and no running job needs goes; everything else stays."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from flows.cli import main as lmforge
from storage.artifact import Store
from storage.atomic import new_temp_dir
from storage.gc import collect

ROOT = Path(__file__).resolve().parents[2]


def test_gc_removes_dead_writers_and_finished_work_only(tmp_path, capsys):
    store = Store(tmp_path)
    with store.writer("pretrain", "done") as w:
        w.write_table(pa.table({"x": [1]}))
    finished = store.work_dir("pretrain", "done")
    (finished / "ckpt.bin").write_bytes(b"\0" * 100_000)
    resumable = store.work_dir("pretrain", "killed")  # not published: a rerun resumes from it
    (resumable / "ckpt.bin").write_bytes(b"\0" * 1000)
    code = (
        "import sys; from pathlib import Path; from storage.atomic import new_temp_dir; new_temp_dir(Path(sys.argv[1]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dedup" / "k1")], cwd=ROOT, check=True
    )  # a writer that died
    (dead,) = (tmp_path / "dedup").glob(".tmp-k1-*")
    (dead / "part-00000.parquet").write_bytes(b"\0" * 5000)
    alive = new_temp_dir(tmp_path / "dedup" / "k2")  # this process is still writing it

    dry = collect(store, dry_run=True)
    assert {p for p, _ in dry.removed} == {dead, finished} and dead.exists() and finished.exists()
    assert lmforge(["gc", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "freed 0.1 MB in 2 item(s)" in out
    assert not dead.exists() and not finished.exists()
    assert resumable.exists() and alive.exists() and store.load("pretrain", "done") is not None
    assert os.listdir(tmp_path / "pretrain") == ["done"]
