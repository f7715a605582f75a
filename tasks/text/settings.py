"""The base of every settings class of the engines and stages: strict, immutable, finite.

- Unknown keys are errors (a typo in a profile must not be silently ignored).
- Values are frozen: a config is hashed into artifact keys, so it must not change after
  it was validated.
- Defaults go through the validators too: a validator that normalizes (sorts a list of
  languages, say) gives the same value whether it came from the default or from a form
  or YAML file that spells the default out, or the same settings would hash to two keys.
- ``inf`` and ``nan`` are refused wherever a float is expected: no threshold or rate in
  lmforge means anything at infinity.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Settings(BaseModel):
    """Base of every engine and stage config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class PartSize(Settings):
    """How big the Parquet parts that a stage writes get: a part closes at ``rows`` rows or
    ``mb`` MiB of content (page bodies, texts), whichever comes first.

    Parts are the unit that later stages map over, one part per worker at a time: more
    parts than cores keep every core busy, and a part's size bounds a worker's memory.
    """

    rows: int = Field(20_000, ge=1, le=10_000_000, description="Most documents in one part.")
    mb: int = Field(128, ge=1, le=65_536, description="Most content in one part, in MiB (bodies or texts).")

    @property
    def max_bytes(self) -> int:
        return self.mb << 20


def describe(error: ValidationError) -> str:
    """Each problem of a validation error as ``key: reason (got value)``, joined by '; '."""
    problems = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        got = f" (got {value!r})" if value is None or isinstance(value, (str, int, float, bool)) else ""
        problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(problems)
