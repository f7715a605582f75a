"""Config files: the shipped profiles validate; bad ones fail with the file, key and reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main as lmforge
from flows.config import ConfigError, PipelineConfig, load_config
from model.config import GPTConfig, LoRAConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo", "smoke"])
def test_shipped_profiles_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == name
    assert cfg.pretrain.train.block_size <= cfg.pretrain.model.block_size


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  kind: crawl\n  crawl: {seeds: ['http://127.0.0.1:1/']}\ndedup:\n  ngrams: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (
        str(path) in str(e.value)
        and "dedup.ngrams" in str(e.value)
        and "Extra inputs are not permitted" in str(e.value)
    )


def test_out_of_range_value_is_rejected_with_its_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("filter:\n  min_lang_score: 1.5\n")
    with pytest.raises(ConfigError, match=r"filter\.min_lang_score: Input should be less than or equal to 1"):
        load_config(path)


def test_inconsistent_sections_are_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  kind: warc\n")
    with pytest.raises(ConfigError, match="warc"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_defaults_spelled_out_give_the_same_config():
    """The UI's form sends every default back explicitly; it must hash to the same keys."""
    default = PipelineConfig()
    spelled_out = PipelineConfig.model_validate(json.loads(default.model_dump_json()))
    assert spelled_out.model_dump(mode="json") == default.model_dump(mode="json")
    assert spelled_out.filter.unsegmented_languages == sorted(spelled_out.filter.unsegmented_languages)


BAD = [
    (
        "pretrain:\n  train: {lr: 1.0e-4, min_lr: 1.0e-3}\n",
        r"pretrain\.train: min_lr \(0\.001\) must not exceed lr \(0\.0001\)",
    ),
    (
        "pretrain:\n  model: {block_size: 64}\n  train: {block_size: 128}\n",
        r"pretrain: train\.block_size \(128\) exceeds model\.block_size \(64\)",
    ),
    (
        "pretrain:\n  model: {n_embd: 100, n_head: 3}\n",
        r"pretrain\.model: n_embd \(100\) must be divisible by n_head \(3\)",
    ),
    (
        "pretrain:\n  train: {max_steps: 10, warmup_steps: 20}\n",
        r"pretrain\.train: warmup_steps \(20\) exceeds max_steps \(10\)",
    ),
    ("pretrain:\n  model: {vocab_size: 1000}\n", r"pretrain: model\.vocab_size comes from the tokenizer"),
    ("finetune:\n  lora: {targets: [q_proj, attn]}\n", r"finetune\.lora: unknown LoRA targets \['attn'\]"),
    ("finetune:\n  lora: {alpha: .inf}\n", r"finetune\.lora\.alpha: Input should be a finite number \(got inf\)"),
    ("finetune:\n  subset_sql: '  '\n", r"finetune\.subset_sql: subset_sql is empty"),
    (
        "finetune:\n  train: {block_size: 512}\n",
        r"finetune\.train\.block_size \(512\) exceeds pretrain\.model\.block_size \(256\)",
    ),
    ("evaluate:\n  where_sql: ''\n", r"evaluate\.where_sql: where_sql is empty"),
    ("store: ''\n", r"store: String should have at least 1 character \(got ''\)"),
    ("name: ../../etc\n", r"name: String should match pattern .* \(got '\.\./\.\./etc'\)"),
    ("filter:\n  min_lang_score: .nan\n", r"filter\.min_lang_score: Input should be a finite number"),
]


@pytest.mark.parametrize("text,reason", BAD, ids=[b[1].split(":")[0].replace("\\", "") for b in BAD])
def test_every_check_runs_when_the_profile_is_loaded(tmp_path, text, reason):
    """Cross-field and value errors that used to surface inside a stage (or never) fail at load time."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_config(path)


def test_the_config_module_imports_no_torch():
    code = "import sys, flows.config; flows.config.load_config('configs/demo.yaml'); assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_bad_profile_stops_the_command_before_any_stage(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  train: {lr: 1.0e-4, min_lr: 1.0e-3}\n")
    assert lmforge(["run", "--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pretrain.train: min_lr (0.001) must not exceed lr (0.0001)" in err
    assert not (tmp_path / "out").exists() and not (ROOT / ".lmforge" / "store").exists()


def test_model_configs_are_the_ones_the_trainer_runs_with():
    """One class per concept: the profile's sections are model/'s configs, with every trainer knob settable."""
    cfg = PipelineConfig()
    assert type(cfg.pretrain.model) is GPTConfig and type(cfg.pretrain.train) is TrainConfig
    assert type(cfg.finetune.lora) is LoRAConfig and type(cfg.finetune.train) is TrainConfig
    loaded = PipelineConfig.model_validate(
        {
            "pretrain": {
                "model": {"rope_theta": 500000.0, "norm_eps": 1e-6},
                "train": {"betas": [0.9, 0.99], "keep_checkpoints": 3},
            }
        }
    )
    assert loaded.pretrain.model.rope_theta == 500000.0 and loaded.pretrain.train.keep_checkpoints == 3
    schema = PipelineConfig.model_json_schema()
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert all(p.get("description") for p in train.values()), [k for k, p in train.items() if not p.get("description")]
