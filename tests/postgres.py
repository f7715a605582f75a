"""A real PostgreSQL server for a test: ``initdb`` in a temporary directory, ``pg_ctl start`` on a free loopback port.

Debian's ``postgresql`` package (the Makefile installs it) provides the binaries, under
``/usr/lib/postgresql/<version>/bin`` when they are not on PATH. PostgreSQL refuses to
run as root, so as root the cluster belongs to the ``postgres`` user the package
creates. Local connections are trusted: the server listens on 127.0.0.1 only and lives
as long as the test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from tests.ports import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed: run `make install` (it installs Debian's postgresql)"
        )
    return found


@contextlib.contextmanager
def running_postgres(database: str = "prefect") -> Iterator[str]:
    """Start a throwaway PostgreSQL with an empty ``database``; yields its ``postgresql+asyncpg://`` URL."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    user = "postgres" if as_user else os.environ.get("USER", "postgres")

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(_binary("initdb"), "-D", str(data / "db"), "--auth=trust", "-U", user, "--encoding=UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c max_connections=200"
        run(_binary("pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start")
        run(
            _binary("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            user,
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {database}",
        )
        yield f"postgresql+asyncpg://{user}@127.0.0.1:{port}/{database}"
    finally:
        with contextlib.suppress(Exception):
            run(_binary("pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def query(url: str, sql: str) -> list[tuple[str, ...]]:
    """Rows of ``sql`` on the database of ``url`` (through psql, as a person would look)."""
    rest = url.split("://", 1)[1]
    user, rest = rest.split("@", 1)
    hostport, database = rest.split("/", 1)
    host, port = hostport.split(":")
    out = subprocess.run(
        [_binary("psql"), "-h", host, "-p", port, "-U", user, "-d", database, "-At", "-F", "\t", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [tuple(line.split("\t")) for line in out.splitlines() if line]
