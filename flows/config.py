"""The pipeline's configuration: one pydantic model with a section per stage.

YAML profiles in ``configs/`` validate against :class:`PipelineConfig`; so do the
Prefect UI's parameter forms, which render from the same models (every field has a
description). Each section is the config class its stage (or the model) runs with, not
a copy. Every check, cross-field ones included (a training block longer than the model's,
``min_lr`` above ``lr``...), runs when a profile or a form is loaded, before any stage
starts: unknown keys and out-of-range values are errors that name the file, the key and
the reason. Importing this module loads no torch and no stage code runs.

The flows' parameter default (what the UI's form shows before anyone edits it) is the
profile named by ``LMFORGE_CONFIG``, else ``configs/demo.yaml``: it is read once, when
the flows are imported, by the process that registers the deployments and by each
worker's flow run, so ``lmforge server --config X`` makes X the form's default.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from storage.documents import SplitConfig
from storage.object_store import is_object_store, parse_url
from tasks.augment import AugmentConfig
from tasks.compare import DeployConfig
from tasks.dedup import DedupConfig
from tasks.evaluate import EvaluateConfig
from tasks.export import ExportConfig
from tasks.extract import ExtractConfig
from tasks.filter import FilterConfig
from tasks.finetune import FinetuneConfig
from tasks.harness import HarnessConfig
from tasks.ingest import IngestConfig
from tasks.parts.core import Execution
from tasks.pretrain import PretrainConfig
from tasks.shards import ShardsConfig
from tasks.stage import StageConfig
from tasks.text.settings import describe
from tasks.tokenizer import TokenizerConfig


class PipelineConfig(StageConfig):
    """Every stage's settings, crawl to export."""

    name: str = Field(
        "lmforge",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Name of this profile, shown in reports and used as the default output folder runs/<name>: letters, digits, '.', '_', '-'.",
    )
    store: str = Field(
        ".lmforge/store",
        min_length=1,
        description="Where artifacts live: a directory (relative to the working directory) or an object store, s3://bucket/prefix (credentials and endpoint from the AWS_* environment). Use an object store or shared storage when workers run on several hosts.",
    )
    execution: Execution = Field(
        default_factory=Execution,
        description="How wide the data stages run: worker processes and the memory ceiling of global steps. Results and artifact keys do not depend on it.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation split by document hash.")
    ingest: IngestConfig = Field(
        default_factory=IngestConfig, description="Where documents come from: a crawl, WARC files or a directory."
    )
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Main-content text extraction from HTML.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and MinHash near-duplicate removal.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Language identification and quality rules.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Back-translation augmentation.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Byte-level BPE training.")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="Token shards and the catalog.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Model shape and pretraining budget.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="LoRA finetuning on a catalog subset.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Held-out evaluation and sample generations."
    )
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX + INT8 export and the release gate.")
    harness: HarnessConfig = Field(
        default_factory=HarnessConfig,
        description="lm-evaluation-harness tasks run on the Hugging Face export by the release (none by default).",
    )
    deploy: DeployConfig = Field(
        default_factory=DeployConfig, description="Promotion: the serving target and how a candidate must compare."
    )

    @field_validator("store")
    @classmethod
    def _store_named(cls, value: str) -> str:
        if not value.strip() or "\x00" in value:
            raise ValueError("store must name a directory")
        if is_object_store(value):
            parse_url(value)  # ValueError naming what is wrong
        return value

    @model_validator(mode="after")
    def _finetune_fits_the_model(self) -> "PipelineConfig":
        if self.finetune.train.block_size > self.pretrain.model.block_size:
            raise ValueError(
                f"finetune.train.block_size ({self.finetune.train.block_size}) exceeds "
                f"pretrain.model.block_size ({self.pretrain.model.block_size})"
            )
        return self

    @property
    def deploy_target(self) -> str:
        """The serving target deploys promote to: ``deploy.target``, else the profile's name."""
        return self.deploy.target or self.name


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, key and reason."""


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML profile."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"[config] {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"[config] {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"[config] {path}: top level must be a mapping of stage sections")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"[config] {path}: {describe(e)}") from None


CONFIG_ENV = "LMFORGE_CONFIG"
DEMO_PROFILE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def default_config() -> PipelineConfig:
    """The profile the flows take when no config is given (``$LMFORGE_CONFIG`` or the demo)."""
    return load_config(os.environ.get(CONFIG_ENV) or DEMO_PROFILE)


DEFAULT_CONFIG = default_config()
