"""The code part of every stage's key comes from the source files its module really imports."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.code_version import EXCLUDED, PACKAGES, closure, code_version, imported_modules
from tests.stages import DATA_STAGES, MODEL_STAGES, STAGES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def project(tmp_path):
    """A copy of the project's packages, to edit."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path) -> dict[str, str]:
    code_version.cache_clear()
    imported_modules.cache_clear()  # the edited files are parsed again
    return {s: code_version(f"tasks.{s}", root) for s in STAGES}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def changed(before: dict, after: dict) -> set[str]:
    return {s for s in STAGES if before[s] != after[s]}


def test_editing_the_split_rule_changes_exactly_the_stages_that_reach_it(project):
    """storage/documents.py: every data stage, and evaluate and compare (through the tokenizer module they load)."""
    before = versions(project)
    edit(
        project / "storage" / "documents.py",
        'return "val" if h / 2**64 < split.val_fraction else "train"',
        'return "val" if h / 2**64 <= split.val_fraction else "train"',
    )
    assert changed(before, versions(project)) == {*DATA_STAGES, "evaluate", "compare"}


def test_editing_the_model_config_changes_exactly_the_model_stages(project):
    before = versions(project)
    edit(
        project / "model" / "config.py",
        "return ((8 * self.n_embd // 3) + 63) // 64 * 64",
        "return ((8 * self.n_embd // 3) + 127) // 128 * 128",
    )
    # compare scores exported ONNX graphs on onnxruntime: the GPT's code is not part of it.
    assert changed(before, versions(project)) == set(MODEL_STAGES) - {"compare"}


def test_a_module_run_as_a_child_process_counts(project):
    """pretrain runs model.train in a torchrun child: the trainer's code is part of its key."""
    before = versions(project)
    edit(project / "model" / "trainer.py", "self.step += 1", "self.step += 1  # edited")
    assert changed(before, versions(project)) == {"pretrain", "finetune"}


def test_an_engine_edit_reaches_only_its_stage(project):
    before = versions(project)
    edit(project / "tasks" / "text" / "minhash.py", '_DIGIT = re.compile(r"\\d")', '_DIGIT = re.compile(r"[0-9]")')
    assert changed(before, versions(project)) == {"dedup"}


def test_reporting_modules_are_excluded(project):
    before = versions(project)
    edit(project / "tasks" / "modeling" / "loss_plot.py", "loss", "Loss")
    edit(project / "tasks" / "prefect_task.py", "Reporting, never the work", "Reporting only")
    assert changed(before, versions(project)) == set()
    assert "tasks.modeling.loss_plot" in EXCLUDED and "tasks.prefect_task" in EXCLUDED


def test_closure_reads_files_and_imports_nothing():
    code = (
        "import sys; from tasks.code_version import closure; c = closure('tasks.pretrain');"
        "assert 'model.trainer' in c and 'model.gpt' in c and 'storage.documents' not in c, sorted(c);"
        "assert 'torch' not in sys.modules and 'model.trainer' not in sys.modules and 'prefect' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_stage_reaches_its_engines():
    assert {"tasks.text.crawl", "tasks.text.warc", "tasks.text.files"} <= set(closure("tasks.ingest"))
    assert {"tasks.text.langid", "tasks.text.quality_rules"} <= set(closure("tasks.filter"))
    assert "tasks.text.translators" in closure("tasks.augment")
    assert "storage.tokens" in closure("tasks.shards") and "tasks.tokenizer" in closure("tasks.shards")
