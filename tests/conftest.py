"""Test-wide settings: one torch thread, isolated Prefect state, offline telemetry."""

import atexit
import os
import shutil
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="lmforge-prefect-")
atexit.register(shutil.rmtree, _prefect_home, ignore_errors=True)
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_prefect_home, "results"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmforge")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # storage-only environments
    pass


def pytest_sessionfinish(session, exitstatus):
    """Prefect stops its temporary server at interpreter exit and logs that to a stream
    pytest has already closed (a "Logging error" trace after the summary): keep it quiet."""
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny GPT trained and exported once per session (tests/model/tiny.py): (model, export result,
    eot id, tokenizer). Read it, never change it: several test modules share it."""
    from tests.model.tiny import export_tiny

    return export_tiny(tmp_path_factory.mktemp("tiny-export"))
