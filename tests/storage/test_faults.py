"""The pause point that lets a test kill a run inside a stage, or act while it waits there."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.faults import pause_point

ROOT = Path(__file__).resolve().parents[2]


def test_without_the_switch_it_returns_at_once(monkeypatch):
    monkeypatch.delenv("LMFORGE_PAUSE_IN", raising=False)
    started = time.monotonic()
    pause_point("dedup")
    assert time.monotonic() - started < 0.1


def test_a_pause_nobody_ends_fails_the_run_after_its_limit(tmp_path, monkeypatch):
    marker = tmp_path / "paused"
    monkeypatch.setenv("LMFORGE_PAUSE_IN", "dedup")
    monkeypatch.setenv("LMFORGE_PAUSE_MARKER", str(marker))
    monkeypatch.setenv("LMFORGE_PAUSE_SECONDS", "0.2")
    pause_point("filter")  # another stage: no pause
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="nobody killed the run"):
        pause_point("dedup")
    assert marker.read_text().split()[0] == "dedup"


def test_a_pause_with_an_until_file_goes_on_once_the_file_exists(tmp_path, monkeypatch):
    marker, until = tmp_path / "paused", tmp_path / "go-on"
    monkeypatch.setenv("LMFORGE_PAUSE_IN", "deploy")
    monkeypatch.setenv("LMFORGE_PAUSE_MARKER", str(marker))
    monkeypatch.setenv("LMFORGE_PAUSE_UNTIL", str(until))
    monkeypatch.setenv("LMFORGE_PAUSE_SECONDS", "30")
    done = threading.Event()
    runner = threading.Thread(target=lambda: (pause_point("deploy"), done.set()))
    runner.start()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text().split()[0] == "deploy" and not done.wait(0.3)  # stopped there...
    until.touch()
    runner.join(10)
    assert done.is_set()  # ...and on its way once the file exists


def test_a_writer_killed_at_its_pause_point_publishes_nothing(tmp_path):
    """Every file written, SIGKILL before the manifest: the key stays unpublished, nothing visible."""
    code = (
        "import sys, pyarrow as pa\n"
        "from storage.artifact import Store\n"
        "with Store(sys.argv[1]).writer('dedup', 'k1', parents=[], config={}, code_version='v') as w:\n"
        "    w.write_table(pa.table({'a': [1, 2, 3]}))\n"
    )
    marker = tmp_path / "paused"
    env = {"LMFORGE_PAUSE_IN": "dedup", "LMFORGE_PAUSE_MARKER": str(marker), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    proc.kill()
    proc.wait()
    from storage.artifact import Store

    store = Store(tmp_path / "store")
    assert store.load("dedup", "k1") is None
    assert [p.name for p in (tmp_path / "store" / "dedup").iterdir() if not p.name.startswith(".")] == []
