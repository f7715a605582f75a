"""Config files: the shipped profiles validate; bad ones fail with the file, key and reason."""

import json
from pathlib import Path

import pytest

from flows.config import ConfigError, PipelineConfig, load_config

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
    assert str(path) in str(e.value) and "dedup.ngrams" in str(e.value) and "Extra inputs are not permitted" in str(e.value)


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
