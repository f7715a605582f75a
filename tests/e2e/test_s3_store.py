"""The smoke pipeline with its store on object storage (a real S3-compatible server started
here), run by two "machines": two processes with their own local copies of the store.

The first builds every stage and uploads each artifact as it is published; the second,
starting with nothing on its disk, builds nothing: every stage finds its artifact in the
bucket, fetches it and reuses it, down to the exported model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pyarrow.fs import FileSelector, FileType

from tests.e2e.site import build_site, serve
from tests.e2e.test_pipeline import _config
from tests.s3_server import running_s3_server
from tests.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
RUN = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


def _run_on_machine(config: Path, machine: Path) -> tuple[dict, str]:
    """``lmforge run`` in its own process, as on a machine whose copy of the store is ``machine``."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_RESULTS_LOCAL_STORAGE_PATH"}
    env["LMFORGE_STORE_CACHE"] = str(machine / "cache")
    out = machine / "run"
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "run", "--config", str(config), "--output-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, (summary.get("error"), proc.stderr[-4000:])
    return summary, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_second_machine_reuses_every_stage_from_the_bucket(tmp_path, monkeypatch):
    build_site(tmp_path / "site")
    site, url = serve(tmp_path / "site")
    try:
        with running_s3_server(monkeypatch) as s3:
            config = _config(tmp_path, url)
            profile = yaml.safe_load(config.read_text())
            profile["store"] = "s3://lmforge/smoke"
            config.write_text(yaml.safe_dump(profile))

            first, _ = _run_on_machine(config, tmp_path / "machine-a")
            assert list(first["stages"]) == STAGES
            built = {name: s["artifact"] for name, s in first["stages"].items()}
            listed = s3.filesystem().get_file_info(FileSelector("lmforge/smoke", recursive=True))
            manifests = {i.path for i in listed if i.type == FileType.File and i.base_name == "manifest.json"}
            assert {f"lmforge/smoke/{ref}/manifest.json" for ref in built.values()} <= manifests

            second, log = _run_on_machine(config, tmp_path / "machine-b")
            assert {name: s["artifact"] for name, s in second["stages"].items()} == built
            for name, ref in built.items():
                assert f"store: fetched {ref} from s3://lmforge/smoke" in log, name
                assert f"{name}: artifact {ref.split('/')[1]} already published, reusing it" in log, name
            assert "store: uploaded" not in log
            # The exported model of machine b is the same bytes as machine a's.
            model_a, model_b = (Path(s["export"]["copied_to"]) for s in (first, second))
            for name in ("model.int8.onnx", "hf/model.safetensors"):
                assert (model_a / name).read_bytes() == (model_b / name).read_bytes(), name
    finally:
        site.shutdown()
