"""A free TCP port on this machine, for the real servers tests start (Prefect, PostgreSQL, Ray, S3, ours)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; a test binds it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
