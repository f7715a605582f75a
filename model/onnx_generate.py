"""Generation with an exported model on onnxruntime: what a deployment runs. No torch.

Imports numpy, onnxruntime and tokenizers only, so ``lmforge generate --model DIR`` works
on a machine without torch. A model directory is what :func:`model.export.export_model`
writes: ``model.onnx`` (fp32), ``model.int8.onnx``, ``tokenizer.json`` and ``export.json``
(the GPT config, the end-of-text id, the file and tensor names).

The loop is :func:`model.generate.generate`'s: the prompt, after an end-of-text id (a
document starts there in training), is fed once with an empty cache (past length 0),
then one token per step with the growing cache (:func:`model.decoding.decode`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from model.decoding import decode

EXPORT_FILE = "export.json"
TOKENIZER_FILE = "tokenizer.json"


def cache_names(n_layer: int, kind: str) -> list[str]:
    """Names of the graph's per-layer cache tensors, keys and values interleaved by layer.

    ``kind`` ``"past"``: ``past_key_values.{i}.key`` / ``.value`` (inputs); ``"present"``:
    ``present.{i}.key`` / ``.value`` (outputs). optimum's names for decoder-with-past graphs.
    """
    prefix = {"past": "past_key_values", "present": "present"}[kind]
    return [f"{prefix}.{i}.{part}" for i in range(n_layer) for part in ("key", "value")]


def cpu_session(path: Path, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``spin=False`` keeps idle intra-op threads from busy-waiting."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxLM:
    """One exported graph in an onnxruntime session: ``(ids, past_k, past_v, past_mask) -> (logits, present_k, present_v)``.

    Caches are lists with one ``(B, H, P, hd)`` array per layer. L, H and hd are read from
    the graph's inputs (fixed at export; batch and past are symbolic).
    ``spin=False`` keeps onnxruntime's idle worker threads from busy-waiting between
    operators: a server's HTTP thread needs that core (measured: more tokens/s with it off).
    """

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        self.path = Path(path)
        self.session = cpu_session(self.path, threads, spin)
        inputs = {i.name: i for i in self.session.get_inputs()}
        # Exports before the per-layer layout took one stacked (L, B, H, P, hd) cache: still read
        # (a store's promoted model may be one), stacked and split here at the cost of a copy a step.
        self.stacked = "past_key" in inputs
        if self.stacked:
            self._past, self._present = ["past_key", "past_value"], ["present_key", "present_value"]
        else:
            n_layer = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
            self._past, self._present = cache_names(n_layer, "past"), cache_names(n_layer, "present")
        missing = {"input_ids", "past_mask", *self._past} - set(inputs)
        if missing or not self._past:
            raise ValueError(f"{self.path}: not an lmforge export, inputs {sorted(missing)} are missing")
        shape = inputs[self._past[0]].shape  # (L, B, H, P, hd) stacked, else (B, H, P, hd)
        n_layer = shape[0] if self.stacked else len(self._past) // 2
        self.cache_dims = (int(n_layer), int(shape[-3]), int(shape[-1]))

    def empty_cache(self, batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        n_layer, n_head, head_dim = self.cache_dims
        return tuple([np.zeros((batch, n_head, 0, head_dim), dtype=np.float32) for _ in range(n_layer)] for _ in "kv")

    def __call__(
        self,
        ids: np.ndarray,
        past_k: list[np.ndarray],
        past_v: list[np.ndarray],
        past_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One graph call; ``past_mask`` (B, P) marks real cached tokens (1) and left padding (0), default all real."""
        if past_mask is None:
            past_mask = np.ones((past_k[0].shape[0], past_k[0].shape[2]), dtype=np.int64)
        feed = {
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "past_mask": np.ascontiguousarray(past_mask, dtype=np.int64),
        }
        if self.stacked:
            feed.update(past_key=np.stack(past_k), past_value=np.stack(past_v))
            logits, k, v = self.session.run(["logits", *self._present], feed)
            return logits, list(k), list(v)
        feed.update(zip(self._past, (t for kv in zip(past_k, past_v) for t in kv)))
        logits, *present = self.session.run(["logits", *self._present], feed)
        return logits, present[0::2], present[1::2]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of whole sequences, no cache: the scoring path of :mod:`model.evaluate`."""
        return self(ids, *self.empty_cache(ids.shape[0]))[0]


class ExportedModel:
    """An exported model directory's ``export.json`` and tokenizer, checked; a backend loads the weights.

    Raises FileNotFoundError naming the missing file when the directory is not a complete export.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        meta_path = self.dir / EXPORT_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {self.dir} is not an exported lmforge model (run the release flow)"
            )
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = Tokenizer.from_file(str(self._file(TOKENIZER_FILE)))
        self.eot_id = int(self.meta["eot_id"])
        self.block_size = int(self.meta["gpt_config"]["block_size"])

    def graph(self, precision: str) -> Path:
        """The ONNX file of ``precision`` (``int8``, ``int4``, ``fp32``)."""
        files = self.meta["files"]
        if precision not in files:
            raise ValueError(f"precision must be one of {sorted(files)}, got {precision!r}")
        return self._file(files[precision])

    def serving_graph(self, precision: str) -> Path | None:
        """The serving graph of ``precision`` (:mod:`model.serving_graph`), or None where the export has none."""
        name = self.meta.get("serve_files", {}).get(precision)
        return self._file(name) if name else None

    def _file(self, name: str) -> Path:
        if not (self.dir / name).is_file():
            raise FileNotFoundError(f"{self.dir / name} not found: the exported model directory is incomplete")
        return self.dir / name


class OnnxGenerator(ExportedModel):
    """Text in, text out, from an exported model directory (INT8 by default)."""

    def __init__(self, model_dir: str | Path, precision: str = "int8", threads: int | None = None):
        super().__init__(model_dir)
        self.lm = OnnxLM(self.graph(precision), threads)

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.95,
        seed: int = 0,
    ) -> list[int]:
        """New token ids after ``prompt_ids`` (without the stop token); same rules as :func:`model.generate.generate`."""
        cache = list(self.lm.empty_cache(1))

        def step(ids: list[int]) -> np.ndarray:
            logits, cache[0], cache[1] = self.lm(np.asarray([ids], dtype=np.int64), cache[0], cache[1])
            return logits[0, -1]

        return decode(step, prompt_ids, self.block_size, max_new_tokens, temperature, top_k, top_p, self.eot_id, seed)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.95,
        seed: int = 0,
    ) -> str:
        """The completion of ``prompt`` (the prompt itself not repeated)."""
        ids = [self.eot_id] + self.tokenizer.encode(prompt).ids
        new = self.generate_ids(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return self.tokenizer.decode(new)


class ServingGraph:
    """The serving graph (:mod:`model.serving_graph`) in an onnxruntime session; :meth:`cache` makes a batch cache on it."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        self.path = Path(path)
        self.session = cpu_session(self.path, threads, spin)
        inputs = {i.name: i for i in self.session.get_inputs()}
        n_layer = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        missing = {"input_ids", "seqlens_k", "total_sequence_length"} - set(inputs)
        if missing or not n_layer:
            raise ValueError(f"{self.path}: not an lmforge serving graph, inputs {sorted(missing)} are missing")
        self.past, self.present = cache_names(n_layer, "past"), cache_names(n_layer, "present")
        _, self.n_head, self.block_size, self.head_dim = inputs[self.past[0]].shape
        self.vocab_size = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")

    def cache(self, max_rows: int) -> "SlotCache":
        return SlotCache(self, max_rows)


class SlotCache:
    """A :class:`model.batching.BatchCache` for the serving graph: the KV cache updated in place.

    One buffer per layer and kind, ``(capacity, H, block_size, hd)``; row i of the batch is
    slot i, holding ``lengths[i]`` tokens. Each graph call binds the rows' slots as both the
    past and the present cache (``GroupQueryAttention`` then writes the new keys and values
    in place) and tells each row's length (``seqlens_k``): no copy of the cache per step and
    no padding, so a decode step costs what the rows hold, not ``rows x longest``. A dropped
    row's slot is refilled with the last row's (one row copied), so the rows stay the
    buffer's first ``rows`` slots and a call binds one contiguous view. The buffers grow by
    doubling up to ``max_rows``: memory follows the load, not the configured maximum.

    A decode step writes its ids and lengths into arrays that an onnxruntime binding already
    points at (one binding per batch size, kept until the buffers grow): binding 20 tensors
    anew every call cost about as much as a one-row step's compute on the demo model.
    """

    def __init__(self, graph: ServingGraph, max_rows: int):
        self.graph, self.max_rows, self.rows = graph, max_rows, 0
        self.lengths = np.zeros(max_rows, dtype=np.int32)
        self._ids = np.zeros((max_rows, 1), dtype=np.int64)
        self._seqlens = np.zeros(max_rows, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)
        self._logits = np.zeros((max_rows, graph.vocab_size), dtype=np.float32)
        self._decoders: dict[int, ort.IOBinding] = {}
        self._buffers = self._allocate(min(max_rows, 4))

    def _allocate(self, capacity: int) -> list[np.ndarray]:
        g = self.graph
        self._decoders.clear()  # they point at the old buffers
        return [np.zeros((capacity, g.n_head, g.block_size, g.head_dim), np.float32) for _ in g.past]

    def add(self, ids) -> np.ndarray:
        if self.rows == self.max_rows:
            raise RuntimeError(f"the batch cache holds {self.max_rows} rows already")
        if self.rows == len(self._buffers[0]):
            grown = self._allocate(min(self.max_rows, 2 * self.rows))
            longest = int(self.lengths[: self.rows].max())
            for new, old in zip(grown, self._buffers):
                new[: self.rows, :, :longest] = old[: self.rows, :, :longest]
            self._buffers = grown
        row, n = self.rows, len(ids)
        prompt = np.asarray([ids], dtype=np.int64)
        binding = self._bind(row, row + 1)
        binding.bind_cpu_input("input_ids", prompt)
        self._seqlens[row], self._total[...] = n - 1, n
        self.graph.session.run_with_iobinding(binding)
        self.lengths[row] = n
        self.rows += 1
        return self._logits[row].copy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        rows = self.rows
        binding = self._decoders.get(rows)
        if binding is None:
            binding = self._decoders[rows] = self._bind(0, rows)
            self._bind_array(binding, "input_ids", self._ids[:rows])
        self._ids[:rows] = ids
        self._seqlens[:rows] = self.lengths[:rows]
        self._total[...] = self.lengths[:rows].max() + 1
        self.graph.session.run_with_iobinding(binding)
        self.lengths[:rows] += 1
        return self._logits[:rows].copy()

    def drop(self, gone: list[int]) -> list[int]:
        gone_set = set(gone)
        left = self.rows - len(gone_set)
        order = list(range(left))
        holes = [i for i in sorted(gone_set) if i < left]
        movers = [i for i in range(left, self.rows) if i not in gone_set]
        for hole, mover in zip(holes, movers):
            n = int(self.lengths[mover])
            for buf in self._buffers:
                buf[hole, :, :n] = buf[mover, :, :n]
            self.lengths[hole] = n
            order[hole] = mover
        self.rows = left
        return order

    def _bind(self, start: int, stop: int) -> ort.IOBinding:
        """A binding of slots ``start:stop`` (caches in place), their lengths and logits rows; ids are bound by the caller."""
        g = self.graph
        binding = g.session.io_binding()
        self._bind_array(binding, "seqlens_k", self._seqlens[start:stop])
        self._bind_array(binding, "total_sequence_length", self._total)
        self._bind_array(binding, "logits", self._logits[start:stop], output=True)
        for past, present, buf in zip(g.past, g.present, self._buffers):
            view = buf[start:stop]  # a leading-axis slice of a C-ordered buffer: contiguous
            self._bind_array(binding, past, view)
            self._bind_array(binding, present, view, output=True)
        return binding

    @staticmethod
    def _bind_array(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
