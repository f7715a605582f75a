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


class OnnxLM:
    """One exported graph in an onnxruntime session: ``(ids, past_k, past_v) -> (logits, present_k, present_v)``.

    The cache layout (L, B, H, P, hd) is read from the graph's ``past_key`` input, whose
    L, H and hd are fixed at export while batch and past are symbolic.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "past_key", "past_value", "past_mask"} - set(inputs)
        if missing:
            raise ValueError(f"{self.path}: not an lmforge export, inputs {sorted(missing)} are missing")
        n_layer, _, n_head, _, head_dim = inputs["past_key"].shape
        self.cache_dims = (int(n_layer), int(n_head), int(head_dim))

    def empty_cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        n_layer, n_head, head_dim = self.cache_dims
        z = np.zeros((n_layer, batch, n_head, 0, head_dim), dtype=np.float32)
        return z, z.copy()

    def __call__(
        self, ids: np.ndarray, past_k: np.ndarray, past_v: np.ndarray, past_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One graph call; ``past_mask`` (B, P) marks real cached tokens (1) and left padding (0), default all real."""
        if past_mask is None:
            past_mask = np.ones((past_k.shape[1], past_k.shape[3]), dtype=np.int64)
        logits, k, v = self.session.run(
            ["logits", "present_key", "present_value"],
            {
                "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                "past_key": past_k,
                "past_value": past_v,
                "past_mask": np.ascontiguousarray(past_mask, dtype=np.int64),
            },
        )
        return logits, k, v

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of whole sequences, no cache: the scoring path of :mod:`model.evaluate`."""
        return self(ids, *self.empty_cache(ids.shape[0]))[0]


class OnnxGenerator:
    """Text in, text out, from an exported model directory (INT8 by default)."""

    def __init__(self, model_dir: str | Path, precision: str = "int8", threads: int | None = None):
        self.dir = Path(model_dir)
        meta_path = self.dir / EXPORT_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {self.dir} is not an exported lmforge model (run the release flow)"
            )
        self.meta = json.loads(meta_path.read_text())
        files = self.meta["files"]
        if precision not in files:
            raise ValueError(f"precision must be one of {sorted(files)}, got {precision!r}")
        for name in (files[precision], TOKENIZER_FILE):
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name} not found: the exported model directory is incomplete")
        self.lm = OnnxLM(self.dir / files[precision], threads)
        self.tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER_FILE))
        self.eot_id = int(self.meta["eot_id"])
        self.block_size = int(self.meta["gpt_config"]["block_size"])

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
