"""Kill -9 inside every stage: the harness shared by tests/e2e/test_kill9.py and bench/kill9.py.

A chain of ``lmforge run`` processes on one store, each in its own process group:

    run 1 is killed (SIGKILL to the whole group) inside ingest,
    run 2 reruns, finds ingest in cache, builds extract, and is killed inside dedup,
    ... and so on through export; the last run completes.

So every stage is killed once at its pause point (:mod:`storage.faults`: every file of its
artifact written but nothing published, or a training child right after a checkpoint)
and every stage is rerun after a kill. After each kill the harness checks the store:
nothing half-written is visible (every key directory holds a manifest that verifies) and
the killed stage published nothing. An uninterrupted run on a second store is the
reference: the chain's final evaluation must equal it, and each stage's output is compared
with its counterpart (:func:`differences`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import yaml

from storage.artifact import MANIFEST, ArtifactError, Store

ROOT = Path(__file__).resolve().parents[2]
FINISHED = re.compile(r"Task run '([a-z]+)-[0-9a-z]+' - Finished in state (\w+)")
RESUMED = re.compile(r'"resumed_from": (\d+)')
MARK_ENV = "LMFORGE_KILL9_RUN"  # carried by every process of a chain run, so leftovers can be found

# Files that record when or how fast a run went, not what it computed: left out of the comparison.
RUN_SPECIFIC_SUFFIX = ".warc.gz"  # the crawl's archive: WARC-Date of every record
RUN_SPECIFIC = {
    "metrics.jsonl",  # wall-clock, tokens/s
    "loss.png",  # drawn from metrics.jsonl
    "summary.json",  # the trainer's wall time and throughput
}
RUN_SPECIFIC_COLUMNS = {"fetched_at"}  # when a page was fetched
# Artifact refs written into a file (compare.json names the models it compared): per crawl, like keys.
REF = re.compile(rb"\b([a-z]+)/[0-9a-f]{24}\b")


@dataclass
class Run:
    """One ``lmforge run`` process: its output lines with arrival times, its stages' end states."""

    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    rc: int | None = None
    killed_after: float | None = None

    def states(self) -> dict[str, str]:
        return {m.group(1): m.group(2) for _, line in self.lines if (m := FINISHED.search(line))}

    def resumed_from(self) -> int | None:
        """The optimizer step a training child of this run resumed from (its summary line), if any."""
        for _, line in self.lines:
            if m := RESUMED.search(line):
                return int(m.group(1))
        return None

    def stage_seconds(self, stage: str, previous: str | None) -> float | None:
        """Seconds between the end of ``previous`` (a cache hit here) and the end of ``stage``."""
        end = self.finished_at(stage)
        start = self.finished_at(previous) if previous else 0.0
        return None if end is None or start is None else end - start

    def finished_at(self, stage: str) -> float | None:
        """Seconds from the run's start to the line saying ``stage`` finished."""
        for t, line in self.lines:
            m = FINISHED.search(line)
            if m and m.group(1) == stage:
                return t - self.started
        return None


@contextmanager
def prefect_server(home: Path, timeout: float = 180) -> Iterator[str]:
    """A Prefect server (SQLite under ``home``) for the chain's runs, in its own process group; yields its API URL.

    Without one every ``lmforge run`` starts Prefect's temporary server (15-25 s on a 2-core
    machine), and a chain of 14 runs pays that 14 times. Killing a run's process group leaves
    this server be, as a kill of a flow process leaves a deployed server be.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_RESULTS_"))}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"})
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def smoke_config(tmp: Path, seed_url: str, store: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["store"] = str(store)
    data["ingest"]["crawl"]["seeds"] = [seed_url]
    path = tmp / f"smoke-{store.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(config: Path, out: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Run]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--output-dir", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: the kill takes all of it, as `kill -9 -PGID` does
    )
    run = Run(time.monotonic())

    def read() -> None:
        for line in proc.stdout:
            run.lines.append((time.monotonic(), line.rstrip("\n")))

    threading.Thread(target=read, daemon=True).start()
    return proc, run


def run_to_end(config: Path, out: Path, env: dict[str, str], timeout: float = 900) -> tuple[Run, dict]:
    proc, run = start(config, out, env)
    run.rc = proc.wait(timeout=timeout)
    time.sleep(0.2)  # the reader thread drains the pipe
    summary = json.loads((out / "summary.json").read_text())
    return run, summary


def run_until_killed(
    config: Path, out: Path, env: dict[str, str], stage: str, marker: Path, timeout: float = 900
) -> Run:
    """Start a run that pauses inside ``stage``; SIGKILL its process group once it is there."""
    marker.unlink(missing_ok=True)
    proc, run = start(config, out, {**env, "LMFORGE_PAUSE_IN": stage, "LMFORGE_PAUSE_MARKER": str(marker)})
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            tail = "\n".join(line for _, line in run.lines[-30:])
            raise AssertionError(f"the run ended (rc {proc.returncode}) before reaching {stage}:\n{tail}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not reach {stage} within {timeout} s")
        time.sleep(0.05)
    run.killed_after = time.monotonic() - run.started
    os.killpg(proc.pid, signal.SIGKILL)
    run.rc = proc.wait()
    return run


def leftovers(value: str, grace: float = 10.0) -> list[int]:
    """Processes of a killed run still alive after ``grace`` seconds (torchrun children included)."""
    from flows.server import processes_with_env

    deadline = time.monotonic() + grace
    while (alive := _alive(processes_with_env(MARK_ENV, value))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _alive(pids: list[int]) -> list[int]:
    """``pids`` less zombies (dead, waiting to be reaped by a parent that is itself gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def published(store: Store) -> dict[str, set[str]]:
    """Every stage's published keys; raises when a visible key directory has no manifest or does not verify."""
    out: dict[str, set[str]] = {}
    for stage_dir in sorted(p for p in store.root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for key_dir in sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".")):
            if not (key_dir / MANIFEST).exists():
                raise ArtifactError(f"{stage_dir.name}/{key_dir.name} is visible without a manifest (half-written)")
            store.verify(store.load(stage_dir.name, key_dir.name))
            out.setdefault(stage_dir.name, set()).add(key_dir.name)
    return out


def differences(a: Store, ref_a: str, b: Store, ref_b: str) -> list[str]:
    """What differs between two artifacts of one stage, run-specific files and columns aside.

    Keys may differ where the content does not: a key hashes its parents' file checksums,
    and ingest's files carry fetch times, so every key downstream of a crawl is per crawl
    (and so are the refs a report names: they are compared as ``stage/<key>``).
    """
    ma, mb = a.load(*ref_a.split("/")), b.load(*ref_b.split("/"))
    if ma is None or mb is None:
        return [f"{ref_a if ma is None else ref_b} missing"]
    fa, fb = {f.path: f for f in ma.files}, {f.path: f for f in mb.files}
    diffs = sorted(set(fa) ^ set(fb))
    for name in sorted(set(fa) & set(fb)):
        if Path(name).name in RUN_SPECIFIC or name.endswith(RUN_SPECIFIC_SUFFIX) or fa[name].sha256 == fb[name].sha256:
            continue
        if name.endswith(".parquet"):
            ta, tb = pq.read_table(ma.path(name)), pq.read_table(mb.path(name))
            keep = [c for c in ta.column_names if c not in RUN_SPECIFIC_COLUMNS]
            if ta.column_names == tb.column_names and ta.select(keep).equals(tb.select(keep)):
                continue
        elif name.endswith((".json", ".md")):
            text_a, text_b = (REF.sub(rb"\1/<key>", m.path(name).read_bytes()) for m in (ma, mb))
            if text_a == text_b:
                continue
        diffs.append(name)
    return diffs


def new_chain_env(base: dict[str, str]) -> tuple[dict[str, str], str]:
    mark = uuid.uuid4().hex
    return {**base, MARK_ENV: mark, "LMFORGE_PAUSE_SECONDS": "900"}, mark
