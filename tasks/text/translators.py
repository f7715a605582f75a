"""Machine translation backends for back-translation, behind one small protocol.

A :class:`Translator` turns a list of documents from one language into another and says
which directions it supports. Languages are ISO 639-1 codes ("en", "es") everywhere in
lmforge; each backend maps them to its own names. Two real backends:

- :class:`ApertiumTranslator`: Debian's rule-based Apertium, run as a subprocess. It is
  the offline default (no weights to fetch, deterministic, about 10k words/s on 2 cores).
  Starting the pipeline of ~10 processes costs ~0.2 s, so many documents go through one
  call, joined by a separator line that Apertium passes through untouched (checked on
  every call: a mismatch is an error, never a silent misalignment of documents).
  Apertium's part-of-speech tagger carries state along its input stream, even across
  null-flush (``-z``) boundaries, so a word can be tagged differently after other
  documents than alone (about 4 words in 1,000 on the Debian handbook). Batches are fixed
  by the input order, so a run is still deterministic; one process per document would be
  exact but cost ~0.2 s of start-up each.
- :class:`MarianTranslator`: a Hugging Face MarianMT model (e.g. opus-mt) per direction,
  loaded from a local directory only (``local_files_only``; nothing is downloaded at run
  time). Marian models are trained on sentences, so documents are split into lines and
  sentences, translated in length-sorted batches, and put back in their layout.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

# ISO 639-3 (Apertium's current names) -> ISO 639-1. Older pairs use 639-1 names directly.
_ISO3_TO_1 = {
    "eng": "en",
    "spa": "es",
    "cat": "ca",
    "glg": "gl",
    "epo": "eo",
    "eus": "eu",
    "isl": "is",
    "fra": "fr",
    "por": "pt",
    "ita": "it",
    "deu": "de",
    "nld": "nl",
    "ron": "ro",
    "oci": "oc",
    "arg": "an",
    "mkd": "mk",
    "bul": "bg",
    "nob": "nb",
    "nno": "nn",
    "swe": "sv",
    "dan": "da",
    "pol": "pl",
    "ces": "cs",
    "slk": "sk",
    "slv": "sl",
    "ukr": "uk",
    "rus": "ru",
    "bel": "be",
    "kaz": "kk",
    "tat": "tt",
    "mlt": "mt",
    "ara": "ar",
    "cym": "cy",
    "bre": "br",
    "gle": "ga",
    "hin": "hi",
    "urd": "ur",
    "ind": "id",
    "msa": "ms",
    "srd": "sc",
}
_MODE = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")
_SEPARATOR_TOKEN = "§§§"
_SEPARATOR = f"\n\n{_SEPARATOR_TOKEN}\n\n"
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_LINE_BREAKS = re.compile(r"(\n+)")


class TranslatorError(RuntimeError):
    """A backend cannot run (not installed, no such direction, a failed call); ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Translator(Protocol):
    """What the augment stage needs from a machine translation backend."""

    name: str
    pairs: frozenset[tuple[str, str]]

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        """One translation per text, in order; an empty text gives an empty translation."""
        ...

    def fingerprint(self) -> str:
        """Changes when the installed models change: part of the stage's cache key."""
        ...


def _check_pair(translator: Translator, src: str, tgt: str) -> None:
    if (src, tgt) not in translator.pairs:
        have = ", ".join(f"{a}-{b}" for a, b in sorted(translator.pairs)) or "none"
        raise TranslatorError(f"{translator.name} backend has no {src}-{tgt} direction (installed: {have})")


class ApertiumTranslator:
    """Apertium through its ``apertium -u <mode>`` command, many documents per call."""

    name = "apertium"

    def __init__(self, binary: str = "apertium", max_batch_chars: int = 200_000, min_chars_per_s: float = 500.0):
        path = shutil.which(binary)
        if path is None:
            raise TranslatorError(
                f"apertium backend: the `{binary}` command is not on PATH",
                "install the Debian packages: apt-get install apertium apertium-eng-spa "
                "(one apertium-<pair> package per language pair), or use backend 'marian'",
            )
        self.binary = path
        self.max_batch_chars = max_batch_chars
        self.min_chars_per_s = min_chars_per_s
        self._env = {**os.environ, "LC_ALL": "C.UTF-8"}
        listing = self._run(["-l"], "", timeout=60)
        self._modes: dict[tuple[str, str], str] = {}
        for mode in listing.split():
            m = _MODE.match(mode)
            if m:
                src, tgt = (_ISO3_TO_1.get(c, c) for c in m.groups())
                self._modes[(src, tgt)] = mode
        self.pairs = frozenset(self._modes)

    def _run(self, args: list[str], text: str, timeout: float) -> str:
        try:
            proc = subprocess.run(
                [self.binary, *args], input=text, capture_output=True, text=True, env=self._env, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise TranslatorError(f"apertium backend: `apertium {' '.join(args)}` ran over {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise TranslatorError(
                f"apertium backend: `apertium {' '.join(args)}` exited with {proc.returncode}: {proc.stderr.strip()[-500:]}"
            )
        return proc.stdout

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        _check_pair(self, src, tgt)
        out = [""] * len(texts)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        batch: list[int] = []
        size = 0
        for i in todo:
            batch.append(i)
            size += len(texts[i])
            if size >= self.max_batch_chars:
                self._translate_batch(texts, batch, self._modes[(src, tgt)], out)
                batch, size = [], 0
        if batch:
            self._translate_batch(texts, batch, self._modes[(src, tgt)], out)
        return out

    def _translate_batch(self, texts: list[str], batch: list[int], mode: str, out: list[str]) -> None:
        # A document containing the separator token would split in two: shorten any run of it.
        joined = _SEPARATOR.join(re.sub("§{3,}", "§", texts[i]) for i in batch)
        timeout = 60 + len(joined) / self.min_chars_per_s
        parts = self._run(["-u", mode], joined, timeout).split(_SEPARATOR_TOKEN)
        if len(parts) != len(batch):
            raise TranslatorError(
                f"apertium backend: {len(batch)} documents in, {len(parts)} out: the document separator "
                f"{_SEPARATOR_TOKEN!r} did not survive mode {mode}"
            )
        for i, part in zip(batch, parts):
            out[i] = _INNER_SPACES.sub(" ", part.strip())

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.binary.encode())
        for mode in sorted(self._modes.values()):
            h.update(mode.encode())
        modes_dir = Path("/usr/share/apertium/modes")
        for f in sorted(modes_dir.glob("*.mode")) if modes_dir.is_dir() else []:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"apertium:{h.hexdigest()[:16]}"


class MarianTranslator:
    """MarianMT models from local directories, one per direction, on the CPU."""

    name = "marian"

    def __init__(self, models: dict[str, str], batch_size: int = 16, max_length: int = 256, num_beams: int = 1):
        self.dirs: dict[tuple[str, str], Path] = {}
        for direction, path in models.items():
            src, _, tgt = direction.partition("-")
            d = Path(path).expanduser()
            if not (d / "config.json").is_file():
                raise TranslatorError(
                    f"marian backend: model directory {d} for {direction} has no config.json",
                    "point marian_models at a local directory written by save_pretrained (e.g. a downloaded opus-mt model)",
                )
            self.dirs[(src, tgt)] = d
        self.pairs = frozenset(self.dirs)
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_beams = num_beams
        self._loaded: dict[tuple[str, str], tuple[object, object]] = {}

    def _load(self, src: str, tgt: str):
        if (src, tgt) not in self._loaded:
            try:
                from transformers import MarianMTModel, MarianTokenizer
            except ImportError as e:
                raise TranslatorError(
                    "marian backend: transformers and sentencepiece are not installed",
                    "pip install 'lmforge[marian]', or use backend 'apertium'",
                ) from e
            d = self.dirs[(src, tgt)]
            tokenizer = MarianTokenizer.from_pretrained(d, local_files_only=True)
            model = MarianMTModel.from_pretrained(d, local_files_only=True).eval()
            self._loaded[(src, tgt)] = (tokenizer, model)
        return self._loaded[(src, tgt)]

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        _check_pair(self, src, tgt)
        segments: list[str] = []
        layouts = []
        for text in texts:
            layout: list[str | list[int]] = []
            for i, piece in enumerate(_LINE_BREAKS.split(text)):
                if i % 2 or not piece.strip():
                    layout.append(piece)
                else:
                    sentences = _SENTENCE_END.split(piece.strip())
                    layout.append(list(range(len(segments), len(segments) + len(sentences))))
                    segments.extend(sentences)
            layouts.append(layout)
        done = self._translate_segments(segments, src, tgt)
        return [
            "".join(p if isinstance(p, str) else " ".join(done[j] for j in p) for p in layout) for layout in layouts
        ]

    def _translate_segments(self, segments: list[str], src: str, tgt: str) -> list[str]:
        # generate() runs under torch.no_grad() itself: this module never imports torch.
        if not segments:
            return []
        tokenizer, model = self._load(src, tgt)
        order = sorted(range(len(segments)), key=lambda i: len(segments[i]), reverse=True)
        out = [""] * len(segments)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = tokenizer(
                [segments[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            generated = model.generate(**enc, max_new_tokens=self.max_length, num_beams=self.num_beams, do_sample=False)
            for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for (src, tgt), d in sorted(self.dirs.items()):
            h.update(f"{src}-{tgt}:{d.resolve()}".encode())
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(d)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"marian:{h.hexdigest()[:16]}"
