"""A real S3-compatible server on this machine: moto's server mode, in its own process.

lmforge talks to it through pyarrow's S3 client exactly as to AWS or MinIO: only the
standard ``AWS_*`` environment differs (endpoint, keys, region), which
:func:`running_s3_server` sets for the test through ``monkeypatch``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from tests.ports import free_port


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def filesystem(self):
        """pyarrow's client for it (to look at or damage what lmforge stored)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint, region="us-east-1", allow_bucket_creation=True)


@contextlib.contextmanager
def running_s3_server(monkeypatch, buckets: tuple[str, ...] = ("lmforge",)) -> Iterator[S3Server]:
    """Start the server, create ``buckets``, point the AWS environment at it; stop it after."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "lmforge-test",
            "AWS_SECRET_ACCESS_KEY": "lmforge-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        server = S3Server(endpoint, proc)
        for bucket in buckets:
            server.filesystem().create_dir(bucket)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
