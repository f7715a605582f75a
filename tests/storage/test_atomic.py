"""Atomic directories and the per-key lock that two runs of one artifact take turns on."""

import subprocess
import sys
import time
from pathlib import Path

from storage.atomic import exclusive

ROOT = Path(__file__).resolve().parents[2]


def hold(path: Path, seconds: float) -> subprocess.Popen:
    code = (
        f"import time; from pathlib import Path; from storage.atomic import exclusive\n"
        f"with exclusive(Path({str(path)!r})):\n    print('held', flush=True); time.sleep({seconds})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_second_holder_waits_for_the_first(tmp_path):
    lock = tmp_path / "_locks" / "dedup-k1.lock"
    holder = hold(lock, 1.5)
    waited = []
    started = time.monotonic()
    with exclusive(lock, on_wait=lambda: waited.append(time.monotonic())):
        took = time.monotonic() - started
    holder.wait()
    assert waited and took >= 1.0


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "k.lock"
    holder = hold(lock, 60)
    holder.kill()
    holder.wait()
    waited = []
    with exclusive(lock, on_wait=lambda: waited.append(1)):
        pass
    assert not waited


def test_a_stage_task_takes_its_keys_lock(tmp_path, caplog):
    """The Prefect task of a stage holds <store>/_locks/<stage>-<key>.lock while the stage runs."""
    from storage.artifact import Store
    from tasks import extract
    from tasks.text.html import ExtractConfig
    from tests.stages import one_page_ingest

    store = Store(tmp_path / "store")
    raw = one_page_ingest(store)
    cfg = ExtractConfig(workers=1)
    key = extract.STAGE.key(cfg, raw=raw, allow_empty=False)
    holder = hold(store.lock_path("extract", key), 1.5)
    started = time.monotonic()
    with caplog.at_level("INFO", logger="lmforge"):
        ref = extract.task.fn(store=store, cfg=cfg, raw=raw)
    holder.wait()
    assert ref == {"stage": "extract", "key": key} and time.monotonic() - started >= 1.0
    assert any("another run is building" in r.getMessage() for r in caplog.records)
