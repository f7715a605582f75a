"""A real Ray cluster of several nodes on this machine, started the way a user starts one.

``ray start --head`` and then ``ray start --address HEAD`` once per further node, each
with ``--num-cpus 1``, so that a stage's parts must spread over the nodes to run two at
a time. Ray's token authentication is off (the cluster lives for one test, on this
machine) and it lives in its own temporary directory; stopping it kills the
processes whose command line names that directory or the head's port (and their children), not every Ray
on the machine as ``ray stop`` would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

from tests.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class RayNodes:
    """A running cluster: ``address`` to join, and what it runs on this machine."""

    address: str
    temp_dir: str
    port: int

    def processes(self) -> list[psutil.Process]:
        """Its daemons (GCS, raylets, agents, Ray Client server) and their children (the workers)."""
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.temp_dir in arg or arg.endswith(f":{self.port}") for arg in p.info["cmdline"] or []):
                    procs += [p, *p.children(recursive=True)]
        return list({p.pid: p for p in procs}.values())


def _stop(nodes: RayNodes) -> None:
    procs = nodes.processes()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


@contextlib.contextmanager
def running_ray_cluster(nodes: int = 2, node_env: list[dict[str, str]] | None = None) -> Iterator[RayNodes]:
    """Start a Ray cluster of ``nodes`` one-CPU nodes; yields it (``.address``: ``127.0.0.1:PORT``).

    ``node_env[i]``: variables of node i (0: the head) and of the workers it starts, beside this
    process's (a node's own ``LMFORGE_STORE_CACHE``, as on a host of its own)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    # Token authentication off, said explicitly: Ray 2.60 turns it on for `ray start --head` when
    # ~/.ray/auth_token exists (a `ray.init()` of a new local Ray writes one), and the second node,
    # or a driver whose Ray read its settings at import, would then be refused.
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus=1", "--disable-usage-stats"]

    def start(*args: str, node: int) -> None:
        own = env | ((node_env or [])[node] if node < len(node_env or []) else {})
        done = subprocess.run([RAY, "start", *args, *common], env=own, capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    address = f"127.0.0.1:{port}"
    cluster = RayNodes(address, temp_dir, port)
    try:
        start(
            "--head",
            "--include-dashboard=false",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={free_port()}",
            node=0,
        )
        for i in range(1, nodes):
            start(f"--address={address}", node=i)
        deadline = time.monotonic() + 60
        while _alive_nodes(address, env) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray cluster at {address} has fewer than {nodes} nodes after 60 s")
            time.sleep(1)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(address: str, env: dict) -> int:
    done = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True, timeout=60)
    return done.stdout.count(" node_")
