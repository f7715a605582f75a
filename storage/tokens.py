"""Token shards: the flat on-disk format that pretraining reads.

A shard is two files in a shards artifact:

- ``tokens-<split>-NNNNN.bin``: the token ids of its documents back to back, raw
  little-endian ``uint16`` (``uint32`` when the vocabulary has more than 65,536 ids), as
  in nanoGPT's ``train.bin`` and datatrove's ``.ds`` files. A reader maps it with
  ``np.memmap`` and slices windows without parsing anything.
- ``tokens-<split>-NNNNN.idx``: ``uint64`` document start offsets into the ``.bin``,
  ``n_docs + 1`` entries, the last one the total token count, so document ``i`` is
  ``tokens[idx[i]:idx[i + 1]]``.

Every document's tokens end with the end-of-text id: a model trained on windows that
cross document boundaries learns where a document stops, and generation knows when to.
A document is never split across shards; a shard closes when the next document would
take it past ``max_tokens`` (one document longer than that gets a shard of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from storage.artifact import ArtifactError, Manifest

DEFAULT_MAX_TOKENS = 1 << 26  # 64M tokens (128 MiB of uint16), MosaicML's and litdata's shard size
IDX_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id below ``vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_names(split: str, number: int) -> tuple[str, str]:
    """File names of shard ``number`` of ``split``: (tokens .bin, offsets .idx)."""
    stem = f"tokens-{split}-{number:05d}"
    return f"{stem}.bin", f"{stem}.idx"


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: its files and sizes (for the manifest and the catalog)."""

    split: str
    bin: str
    idx: str
    n_docs: int
    n_tokens: int


class TokenShardWriter:
    """Appends documents to the token shards of one split inside a directory.

    ``add`` returns where each document landed, ``(shard .bin name, start, n_tokens)``
    with ``n_tokens`` counting the end-of-text id, which is what the document index
    records. ``close`` writes the last ``.idx`` and lists every shard written.
    """

    def __init__(
        self,
        directory: str | Path,
        split: str,
        vocab_size: int,
        eot_id: int,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        first: int = 0,
    ):
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"eot_id {eot_id} is outside the vocabulary of {vocab_size} ids")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.max_tokens = max_tokens
        self.first = first  # number of the first shard written (files below it exist already)
        self.dtype = token_dtype(vocab_size)
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def add(self, docs: Sequence[Sequence[int]]) -> list[tuple[str, int, int]]:
        """Append documents (token ids without EOT); return (shard, start, n_tokens) for each."""
        if not docs:
            return []
        return self.add_flat(*flatten(docs, self.eot_id, self.vocab_size))

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> list[tuple[str, int, int]]:
        """Append documents already laid out as :func:`flatten` does (each ending with EOT,
        ``lengths`` counting it): what a worker encoded ahead, copied without a Python loop per token."""
        if not len(lengths):
            return []
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        if int(ends[-1]) != len(flat):
            raise ValueError(f"{len(flat)} token ids for documents of {int(ends[-1])} tokens in all")
        flat = np.asarray(flat).astype(self.dtype, copy=False)
        placed: list[tuple[str, int, int]] = []
        i = 0
        while i < len(lengths):
            base = int(ends[i - 1]) if i else 0
            room = max(self.max_tokens - self._tokens, 0)
            j = int(np.searchsorted(ends, base + room, side="right"))
            if j == i:
                if self._tokens:
                    self._finish_shard()
                    continue
                j = i + 1  # a document longer than max_tokens: a shard of its own
            if self._file is None:
                self._open_shard()
            name = shard_names(self.split, self.first + len(self.shards))[0]
            starts = self._tokens + np.concatenate(([0], ends[i : j - 1] - base))
            self._file.write(flat[base : int(ends[j - 1])].tobytes())
            self._lengths.append(lengths[i:j])
            placed.extend((name, int(s), int(n)) for s, n in zip(starts, lengths[i:j]))
            self._tokens += int(ends[j - 1]) - base
            i = j
        return placed

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; return every shard of this split (none if no document came)."""
        if self._file is not None:
            self._finish_shard()
        return list(self.shards)

    def _open_shard(self) -> None:
        self._file = open(self.directory / shard_names(self.split, self.first + len(self.shards))[0], "wb")
        self._lengths = []
        self._tokens = 0

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        lengths = np.concatenate(self._lengths)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(IDX_DTYPE)
        bin_name, idx_name = shard_names(self.split, self.first + len(self.shards))
        offsets.tofile(self.directory / idx_name)
        self.shards.append(ShardInfo(self.split, bin_name, idx_name, len(lengths), int(offsets[-1])))
        self._tokens = 0


def flatten(docs: Sequence[Sequence[int]], eot_id: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids back to back, each followed by ``eot_id``, in :func:`token_dtype`, and each
    document's length with its EOT; ValueError naming an id outside the vocabulary."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(chain.from_iterable(chain(d, (eot_id,)) for d in docs), dtype=np.int64, count=int(lengths.sum()))
    if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = int(flat[(flat < 0) | (flat >= vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary of {vocab_size} ids")
    return flat.astype(token_dtype(vocab_size)), lengths


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ArtifactError(
            f"token file {path.name}: {size} bytes is not a whole number of {dtype.name} values (is the dtype right?)"
        )
    # np.memmap refuses empty files; an empty array reads the same.
    if size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenShard:
    """Read-only view of one shard: memory-mapped tokens and document offsets."""

    def __init__(self, bin_path: str | Path, idx_path: str | Path, dtype: str | np.dtype):
        self.bin_path = Path(bin_path)
        self.idx_path = Path(idx_path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokens = _map(self.bin_path, self.dtype)
        self.offsets = _map(self.idx_path, IDX_DTYPE)
        if len(self.offsets) == 0 or self.offsets[0] != 0 or int(self.offsets[-1]) != len(self.tokens):
            raise ArtifactError(
                f"token shard {self.bin_path.name}: its index {self.idx_path.name} does not match "
                f"its {len(self.tokens)} tokens (is the dtype {self.dtype} right?)"
            )

    @property
    def name(self) -> str:
        return self.bin_path.name

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, its final EOT included."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} is not in {self.name} ({self.n_docs} documents)")
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def span(self, start: int, n_tokens: int) -> np.ndarray:
        """``n_tokens`` tokens from offset ``start`` (what the document index records)."""
        if start < 0 or n_tokens < 0 or start + n_tokens > self.n_tokens:
            raise IndexError(f"span [{start}, {start + n_tokens}) is outside {self.name} ({self.n_tokens} tokens)")
        return self.tokens[start : start + n_tokens]


def open_split(manifest: Manifest, split: str) -> list[TokenShard]:
    """The shards of one split of a shards artifact, in order (empty if the split has none)."""
    dtype = manifest.meta.get("dtype")
    if dtype is None:
        raise ArtifactError(f"artifact {manifest.ref} has no token dtype in its meta: not a token shards artifact")
    shards = []
    for f in manifest.files_with_prefix(f"tokens-{split}-"):
        if f.path.endswith(".bin"):
            shards.append(TokenShard(manifest.path(f.path), manifest.path(f.path[: -len(".bin")] + ".idx"), dtype))
    return shards


def read_spans(spans: Iterable[tuple[str | Path, int, int]], dtype: str | np.dtype) -> Iterator[np.ndarray]:
    """Token arrays of ``(shard .bin path, start, n_tokens)`` spans, e.g. from the catalog.

    Each shard file is mapped once, however many spans point into it.
    """
    maps: dict[Path, np.ndarray] = {}
    dt = np.dtype(dtype).newbyteorder("<")
    for path, start, n in spans:
        path = Path(path)
        if path not in maps:
            maps[path] = _map(path, dt)
        tokens = maps[path]
        if start < 0 or n < 0 or start + n > len(tokens):
            raise IndexError(f"span [{start}, {start + n}) is outside {path.name} ({len(tokens)} tokens)")
        yield tokens[start : start + n]
