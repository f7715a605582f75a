"""The model stages' torchrun child: a spec that does not validate never starts it, and is not retried."""

import pytest

from tasks.modeling.torchrun import train_in_child
from tasks.prefect_task import _not_bad_input
from tasks.stage import StageError


class _State:
    def __init__(self, error):
        self.error = error

    def result(self):
        raise self.error


def test_a_bad_spec_is_a_stage_error_before_any_process_starts(tmp_path):
    spec = {
        "model": {"vocab_size": 64, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"lr": 1e-4, "min_lr": 1e-3, "warmup_steps": 0, "max_steps": 2},
        "data": {"train": [{"path": str(tmp_path / "none.bin"), "dtype": "uint16"}]},
    }
    seen = []
    with pytest.raises(StageError, match=r"\[pretrain\] .*spec\.json: the train spec is not valid: .*min_lr") as err:
        train_in_child("pretrain", tmp_path, spec, 1, seen.append)
    assert not seen and not (tmp_path / "checkpoints").exists()  # torchrun never ran
    assert not _not_bad_input(None, None, _State(err.value))  # and Prefect does not retry it
    assert _not_bad_input(None, None, _State(RuntimeError("[pretrain] training failed (exit code 1)")))
