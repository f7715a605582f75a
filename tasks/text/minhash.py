"""MinHash signatures and LSH band keys for near-duplicate detection.

Design decisions:

- Text is normalized as datatrove's ``simplify_text`` does: case folded (``casefold``,
  so "STRASSE" meets "straße"), Latin diacritics stripped (NFD, then the combining marks U+0300-U+036F removed), digits
  -> "0", punctuation -> space, whitespace collapsed. Exact dedup hashes this string
  too, so "Hello,  World" and "hello world" are the same document. Each character of
  a script written without spaces (Chinese, Japanese, Thai...) counts as a word, so
  their shingles are character n-grams rather than whole sentences.
- Shingles are word n-grams of the normalized text. A document with fewer than ``n``
  words has one shingle, its whole normalized text (empty text included), so every
  document has a signature and short identical snippets still meet.
- Hashing is vectorized per document with numpy (faster than hashing each shingle in
  Python, as datasketch's ``update`` does; see bench/stages.py): each word is hashed once with
  CRC-32 (C speed), a shingle's 64-bit hash is a fixed linear combination of its words'
  hashes put through the MurmurHash3 64-bit finalizer, and its top 32 bits feed the
  permutations.
- The permutations are datasketch's ``"affine32"`` scheme (its 2.x default), with the
  permutation parameters that ``datasketch.MinHash(num_perm, seed)`` draws: a signature
  here equals ``MinHash(num_perm, seed, hashfunc=<shingle hash>)`` fed the same
  shingles (a test checks this), so :func:`as_minhash` gives a real datasketch
  ``LeanMinHash`` for estimates.
- A band key is the 64-bit hash of the band's ``rows`` values (same finalizer). Equal
  bands give equal keys; unequal bands collide with probability about 2^-64, which is
  negligible next to the LSH's own false positives.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from functools import lru_cache

import numpy as np

SCHEME = "affine32"
_COMBINING = re.compile("[\u0300-\u036f]")
# Scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, kana, CJK ideographs.
_UNSPACED = re.compile(
    "([\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])"
)
_PUNCT = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")
_U64 = np.uint64
# The same folding for ASCII text in one C pass (str.translate, 5x faster than the two regexes on
# English prose); built from the regexes, so it cannot differ.
_ASCII_FOLD = {
    c: ("0" if _DIGIT.fullmatch(chr(c)) else " ")
    for c in range(128)
    if _DIGIT.fullmatch(chr(c)) or _PUNCT.fullmatch(chr(c))
}
# Odd 64-bit multipliers: position k of an n-gram (and row k of a band) is weighted by _MULT[k].
_MULT = np.random.RandomState(0x5EED).randint(0, 1 << 62, size=64, dtype=np.uint64) * _U64(2) + _U64(1)


def normalize(text: str) -> str:
    """The text as dedup compares it (see the module docstring)."""
    text = text.casefold()
    if text.isascii():
        return " ".join(text.translate(_ASCII_FOLD).split())
    text = _UNSPACED.sub(r" \1 ", _COMBINING.sub("", unicodedata.normalize("NFD", text)))
    text = _PUNCT.sub(" ", _DIGIT.sub("0", text))
    return " ".join(text.split())


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection on uint64 (wraps by design)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine32 permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(normalized: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the word n-grams of a normalized text (one shingle if it is shorter)."""
    words = normalized.split()
    if len(words) < ngram:
        return _fmix64(np.array([zlib.crc32(normalized.encode())], dtype=_U64) + _U64(len(words)))
    w = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=_U64, count=len(words))
    m = len(words) - ngram + 1
    h = np.zeros(m, dtype=_U64)
    for k in range(ngram):
        h += w[k : k + m] * _MULT[k]
    return _fmix64(h)


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b) for this num_perm and seed.

    Drawn as ``datasketch.MinHash(num_perm, seed, scheme="affine32")`` draws them (its
    ``_init_permutations``: ``a`` a 31-bit draw times two plus one, so odd, ``b`` a 32-bit draw, from
    ``RandomState(seed)``), not by building one: importing datasketch loads scipy, 0.5 to 0.7 s
    in every worker process before its first part (measured on the 2-core build machine).
    A test checks both against datasketch's own.
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signature(shingles: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """The MinHash signature (uint32[num_perm]) of a set of 64-bit shingle hashes."""
    a, b = permutations(num_perm, seed)
    hv = _fmix32((shingles >> _U64(32)).astype(np.uint32))
    return (hv[:, None] * a[None, :] + b[None, :]).min(axis=0)


def as_minhash(sig: np.ndarray, seed: int):
    """A datasketch LeanMinHash over a signature, for ``jaccard`` estimates."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=sig, scheme=SCHEME)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n_docs, bands]: one key per band of each signature (``sigs`` is [n_docs, bands*rows])."""
    v = sigs.reshape(len(sigs), bands, rows).astype(_U64)
    h = np.zeros(v.shape[:2], dtype=_U64)
    for r in range(rows):
        h = _fmix64(h ^ (v[:, :, r] * _MULT[r]))
    return h


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sets of shingle hashes."""
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0
