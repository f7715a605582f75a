"""Text of HTML pages: decoding and main-content extraction.

Design decisions:

- resiliparse's ``extract_plain_text(main_content=True)``: DCLM's choice, 7-10x faster
  than trafilatura for a little more boilerplate. Image alt texts are off by default: on
  real pages they are mostly icons and logos.
- Decoding follows the WHATWG order: a byte-order mark, then the HTTP charset when it is
  a known label (``latin-1`` means windows-1252, as in browsers), then ``<meta>`` and
  byte statistics (``detect_encoding``), then UTF-8. The first strict decode wins;
  if none works the first candidate decodes leniently, and the page is ``undecodable``
  when more than ``max_bad_char_ratio`` of its characters are replacement or control
  characters (binary served as HTML, a wrong charset beyond repair).
- A time limit per document: resiliparse is C++ holding the GIL and cannot be
  interrupted from Python; :mod:`tasks.text.extract_parts` enforces it from outside.
- text/plain bodies (files, WET records) are decoded and passed through.
"""

from __future__ import annotations

import codecs
import logging
import re

from pydantic import Field, model_validator
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

from tasks.text.settings import PartSize, Settings

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\ufffd]")


class ExtractConfig(Settings):
    """How text is taken out of the raw pages."""

    @model_validator(mode="before")
    @classmethod
    def _workers_moved(cls, data):
        """``workers`` went to ``execution.workers`` (extraction maps over parts like dedup
        and filter); a profile that still sets it loads, and the value is not used."""
        if isinstance(data, dict) and "workers" in data:
            logging.getLogger("lmforge.extract").warning(
                "extract.workers is no longer used: extraction runs on execution.workers' part workers"
            )
            data = {k: v for k, v in data.items() if k != "workers"}
        return data

    part_size: PartSize = Field(
        default_factory=PartSize,
        description="Size of the parts written: dedup, filter and the later stages run one part per worker.",
    )
    timeout_seconds: float = Field(
        5.0,
        gt=0.0,
        le=600.0,
        description="Time limit per document (decoding + extraction): a document gets at least this long, at most twice this; a slower one is dropped as extract_timeout.",
    )
    min_chars: int = Field(
        200, ge=0, description="Shortest extracted text kept, in characters; shorter is dropped as too_short."
    )
    max_chars: int = Field(
        1_000_000,
        ge=1000,
        description="Longest extracted text kept, in characters; longer is dropped as too_long (a runaway page would stall the filter and the tokenizer).",
    )
    max_word_chars: int = Field(
        10_000,
        ge=50,
        description="Longest run of characters without white space kept; a page with a longer one (a base64 or minified blob) is dropped as word_too_long, in every language. C4 drops a line with a word over 1,000 characters; here the whole page would go, and real pages quote URLs of over 1,000, so the default is higher.",
    )
    main_content: bool = Field(
        True,
        description="Keep only the main content (resiliparse's boilerplate removal): no navigation, headers, footers.",
    )
    alt_texts: bool = Field(False, description="Include image alt texts in the text.")
    preserve_formatting: bool = Field(
        True, description="Keep paragraph and line breaks (line-based quality filters need them)."
    )
    max_bad_char_ratio: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Most replacement/control characters, as a fraction of the decoded text, before a page counts as undecodable.",
    )


class Undecodable(ValueError):
    """The bytes do not decode to text under any plausible encoding."""


def decode_body(body: bytes, charset: str | None, max_bad_char_ratio: float) -> str:
    """Text of a page's bytes (see the module docstring for the order of encodings tried)."""
    labels = [enc for bom, enc in _BOMS if body.startswith(bom)][:1]
    labels += [charset, detect_encoding(body, from_html_meta=True), "utf-8"]
    encodings: list[str] = []
    for label in labels:
        enc = map_encoding_to_html5(label, fallback_utf8=False) if label else None
        try:
            enc = codecs.lookup(enc).name if enc else None
        except LookupError:
            enc = None
        if enc and enc not in encodings:
            encodings.append(enc)
    for enc in encodings:
        try:
            text = body.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        enc = encodings[0]
        text = body.decode(enc, errors="replace")
    text = text.lstrip("\ufeff")
    bad = len(_BAD_CHARS.findall(text))
    if text and bad > max_bad_char_ratio * len(text):
        raise Undecodable(f"{bad} of {len(text)} characters unreadable as {enc}")
    return text


def longest_word(text: str) -> int:
    """Length of the longest run of non-white-space characters (0 for an empty text)."""
    return max(map(len, text.split()), default=0)


def extract_document(body: bytes, content_type: str, charset: str | None, cfg: ExtractConfig) -> str:
    """Plain text of one raw page: decoded, then main content for HTML."""
    text = decode_body(body, charset, cfg.max_bad_char_ratio)
    if content_type == "text/plain":
        return text.replace("\r\n", "\n").strip()
    return extract_plain_text(
        text, main_content=cfg.main_content, alt_texts=cfg.alt_texts, preserve_formatting=cfg.preserve_formatting
    ).strip()


def outcome(job: tuple, cfg: ExtractConfig) -> tuple[str | None, str, str]:
    """(drop reason or None, text, detail) for one (body, content_type, charset) job; never raises."""
    try:
        return None, extract_document(*job, cfg), ""
    except Undecodable as e:
        return "undecodable", "", str(e)
    except Exception as e:  # a bad page must not stop the worker
        return "extract_error", "", f"{type(e).__name__}: {e}"[:500]


def judge_text(reason: str | None, text: str, detail: str, cfg: ExtractConfig) -> tuple[str | None, str]:
    """The page's drop reason and detail once its text is known: extraction's own, or the
    text's length and longest word against the limits of ``cfg``."""
    if reason is not None:
        return reason, detail
    if not text:
        return "empty_text", "no text left after extraction"
    if len(text) < cfg.min_chars:
        return "too_short", f"{len(text)} characters < min_chars={cfg.min_chars}"
    if len(text) > cfg.max_chars:
        return "too_long", f"{len(text)} characters > max_chars={cfg.max_chars}"
    if (longest := longest_word(text)) > cfg.max_word_chars:
        return "word_too_long", f"a word of {longest} characters > max_word_chars={cfg.max_word_chars}"
    return None, ""
