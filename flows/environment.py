"""The process environment of ``lmforge`` commands: Prefect settings and where a profile's store is.

Shared by ``lmforge run`` and ``lmforge server`` (which sets the same for its workers), and
read before any heavy import: it only places Prefect's result storage and quiets it.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.object_store import cache_dir, is_object_store


def prepare_environment(store: Path) -> None:
    """Prefect settings for a command-line run: offline, lmforge's logs in the run log, records in the store."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmforge")
    # Without a server Prefect starts a temporary one; on a loaded 2-core machine that can take 30 s+.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(store / "_prefect_results"))


def store_of(config_path: str | Path, relative_to: Path | None = None) -> Path:
    """The absolute local store a profile names (``relative_to`` for a relative one, default
    the cwd; for an ``s3://`` store, this machine's copy of it).

    Read with plain YAML, before the heavy config models import: it only places Prefect's
    result storage, and a profile that does not parse fails later with the full error.
    """
    import yaml

    try:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    value = raw.get("store") if isinstance(raw, dict) else None
    if is_object_store(value):
        try:
            return cache_dir(value)  # this machine's copy of the bucket's store
        except ValueError:
            pass  # the profile's validation says what is wrong with the URL
    store = Path(value if isinstance(value, str) and value.strip() else ".lmforge/store").expanduser()
    return (relative_to / store if relative_to is not None else store).resolve()
