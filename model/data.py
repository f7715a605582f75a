"""Training windows drawn from flat token files, stateless so that resuming is exact.

Design decisions:
- Input is a list of ``(path, dtype)`` raw little-endian ``uint16``/``uint32`` files (the
  token shards' ``tokens-*.bin``). They are memory-mapped and read as one logical stream,
  so a window may span two shards, as documents are separated by EOS tokens anyway
  (nanoGPT samples the same way from one big ``train.bin``). No storage import: the task
  layer passes plain paths.
- Window starts are drawn uniformly at random from a generator seeded by
  ``(seed, step, micro_step)`` alone: there is no iterator state to checkpoint, the data
  position *is* the step, and a resumed run sees exactly the batches it would have seen.
  Sampling is with replacement (nanoGPT's): there are no epochs, and over a long run every
  region of the data is visited about equally often.
- Each (step, micro_step) draws ``world * batch_size`` windows and rank ``r`` takes rows
  ``r*batch_size .. (r+1)*batch_size``. The global batch therefore does not depend on how
  it is split: 2 ranks x 4 rows see the same data as 1 rank x 8 rows, which is what makes
  the DDP-vs-single-process parity test (and changing the world size on resume) possible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_DTYPES = ("uint16", "uint32")


def token_dtype(dtype: str | np.dtype) -> np.dtype:
    """The little-endian numpy dtype of a token file ("uint16", "<u2", np.uint32 ...)."""
    try:
        dt = np.dtype(dtype).newbyteorder("<")
    except TypeError:
        dt = None
    if dt is None or dt.name not in _DTYPES:
        raise ValueError(f"token dtype must be one of {_DTYPES}, got {dtype!r}")
    return dt


class TokenWindows:
    """Random ``(x, y)`` next-token windows over the concatenation of flat token files."""

    def __init__(
        self, files: Sequence[tuple[str | Path, str | np.dtype]], seed: int = 0, vocab_size: int | None = None
    ):
        if not files:
            raise ValueError("TokenWindows needs at least one token file")
        self.seed = seed
        self.vocab_size = vocab_size
        self.files: list[Path] = []
        self._maps: list[np.memmap] = []
        for path, dtype in files:
            path = Path(path)
            dt = token_dtype(dtype)
            if not path.is_file():
                raise FileNotFoundError(f"token file not found: {path}")
            size = path.stat().st_size
            if size % dt.itemsize:
                raise ValueError(f"{path}: {size} bytes is not a whole number of {dt.name} tokens (wrong dtype?)")
            self.files.append(path)
            if size == 0:
                continue
            self._maps.append(np.memmap(path, dtype=dt, mode="r"))
        # starts[i] is the offset of the i-th non-empty file in the logical stream; starts[-1] is its length.
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``start .. start+n`` of the logical stream, crossing file boundaries."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        out, pos = [], start
        while n > 0:
            m = self._maps[i]
            lo = pos - int(self._starts[i])
            take = min(n, len(m) - lo)
            out.append(m[lo : lo + take])
            pos, n, i = pos + take, n - take, i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _describe(self) -> str:
        names = [str(f) for f in self.files[:3]]
        more = len(self.files) - len(names)
        return ", ".join(names) + (f" and {more} more files" if more else "")

    def require(self, block_size: int) -> None:
        """Raise a clear ValueError when no window of ``block_size + 1`` tokens fits."""
        if len(self) < block_size + 1:
            raise ValueError(
                f"need at least block_size+1 = {block_size + 1} tokens, got {len(self)} "
                f"in {self._describe()}; lower block_size or add data"
            )

    def batch(
        self, step: int, micro_step: int, rank: int, world: int, batch_size: int, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` int64 tensors of shape (batch_size, block_size); y is x shifted by one."""
        self.require(block_size)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        rng = np.random.default_rng([self.seed, step, micro_step])
        starts = rng.integers(0, len(self) - block_size, size=world * batch_size)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        rows = np.stack([self._read(int(s), block_size + 1) for s in mine]).astype(np.int64)
        if self.vocab_size is not None and rows.max() >= self.vocab_size:
            raise ValueError(
                f"token id {int(rows.max())} >= vocab_size {self.vocab_size} in {self._describe()}; "
                "the token files were made with another tokenizer, or the dtype is wrong"
            )
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
