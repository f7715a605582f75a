"""The serving engine: one thread runs the continuous batcher; requests come and go through queues.

No web framework, and no torch unless the torch backend is asked for (:func:`load_lm`):
:mod:`model.serving.api` puts an HTTP face on it.

Design decisions:
- One engine thread owns the :class:`model.batching.ContinuousBatcher` and the model, so
  the batcher needs no locks. Request handlers (asyncio, in the web server's thread)
  hand it work through a thread-safe inbox and get tokens back through an
  ``asyncio.Queue`` per request, fed with ``loop.call_soon_threadsafe`` once per step
  with all of the step's events (not once per token).
- Admission control: at most ``max_queue`` requests wait or run; one more is refused at
  once (:class:`Overloaded`, the API's 429 with ``Retry-After``) instead of queueing
  without bound.
- A request ends by itself (length, end of text, a stop string), by its deadline
  (``timeout``: the reason says so), or by its client leaving: :meth:`Engine.cancel` frees
  its batch row at the next step.
- Stop strings are matched on the decoded text; the text is cut before the match, as the
  OpenAI API does. Text is decoded incrementally (``tokenizers``' ``DecodeStream``): a
  character split over tokens is sent once it is whole, never as U+FFFD.
- Metrics (:mod:`model.serving.metrics`) count what a Prometheus scrape needs: requests
  by status, queue depth, batch sizes, time to first token, latency, tokens generated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers.decoders import DecodeStream

from model.batching import BatchCache, ContinuousBatcher, Generation, GenerationRequest, PaddedCache
from model.onnx_generate import ExportedModel, OnnxLM, ServingGraph
from model.serving.metrics import Metrics

log = logging.getLogger("lmforge.serve")


class Overloaded(RuntimeError):
    """The engine holds ``max_queue`` requests already; retry after a moment."""


class Retired(RuntimeError):
    """The engine was replaced by another model's and takes no new request (take the current one)."""


@dataclass
class Completion:
    """One request as the engine tracks it; ``events`` receives ``("token", text)`` / ``("end", reason)``."""

    request: GenerationRequest
    stop: list[str]
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    generation: Generation | None = None
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent
    first_token_at: float | None = None
    # Text as tokens come, a few tokens decoded per step (not the whole generation each token);
    # it holds back the bytes of a character that is not whole yet.
    detokenizer: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    hold: int = field(init=False)  # characters held back while streaming: a stop string could start in them

    def __post_init__(self) -> None:
        self.hold = max((len(s) for s in self.stop), default=1) - 1


class Engine:
    """Loads an exported model directory and serves generations from it on one thread."""

    def __init__(
        self,
        model_dir: str | Path,
        precision: str | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        threads: int | None = None,
        batching: bool = True,
        metrics: Metrics | None = None,
        backend: str = "onnx",
        device: str = "cpu",
    ):
        # The model directory is read as `lmforge generate` reads it: one place checks its files.
        export = ExportedModel(model_dir)
        self.dir, self.meta, self.tokenizer = export.dir, export.meta, export.tokenizer
        self.eot_id, self.block_size = export.eot_id, export.block_size
        # The size bound of tokens_at_least reasons on the text's own bytes: it holds where the tokens'
        # bytes are the text's (lmforge's byte-level BPE, no normalizer), and is not used elsewhere.
        byte_level = self.tokenizer.normalizer is None
        self.max_prompt_bytes = self.block_size * max_token_bytes(self.tokenizer) if byte_level else None
        self.new_cache, self.precision, self.graph = load_lm(export, backend, precision, device, threads)
        self.backend, self.device = backend, device
        self.max_queue = max_queue
        self.max_batch = max_batch if batching else 1
        self.batcher = self._new_batcher()
        self.metrics = metrics or Metrics()  # shared by the engines a switching server goes through
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Completion] = {}
        self._admitted = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    def _new_batcher(self) -> ContinuousBatcher:
        return ContinuousBatcher(self.new_cache(self.max_batch), self.block_size, self.eot_id, self.max_batch)

    # --- called from request handlers (any thread) -------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def retire(self, grace: float) -> None:
        """Stop once every request admitted so far has ended (at most ``grace`` seconds); blocks.

        From the moment nothing is in flight, :meth:`submit` raises :class:`Retired`, so a
        request handler that took this engine just before a switch tries the new one.
        """
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                if self._admitted == 0 or time.monotonic() > deadline:
                    self._stopping = True
                    break
            time.sleep(0.05)
        self.stop()

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids as generation feeds them: after the end-of-text id that starts every document."""
        return [self.eot_id] + self.tokenizer.encode(prompt).ids

    def tokens_at_least(self, prompt: str) -> int | None:
        """A lower bound on ``prompt``'s tokens when it is sure to pass the context, else None, without encoding it.

        Encoding takes the GIL and the event loop for its whole length (0.56 s for 1 MB of text
        on the 2-core build machine, every stream of every client waiting), so a prompt that
        cannot fit is refused by its size: each token covers at most ``max_token_bytes`` of
        its UTF-8 bytes (byte-level BPE: the tokens' bytes are the text's bytes).
        """
        if self.max_prompt_bytes is None or len(prompt) * 4 <= self.max_prompt_bytes:
            return None  # at most 4 bytes a character: no need to count them
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size <= self.max_prompt_bytes:
            return None
        return -(-size // (self.max_prompt_bytes // self.block_size))

    def refuse_if_full(self) -> None:
        """Raise :class:`Overloaded` if :meth:`submit` would: a handler asks before tokenizing a prompt,
        so a full server does no work for a request it refuses (:meth:`submit` checks again)."""
        with self._lock:
            self._check_room()

    def submit(self, request: GenerationRequest, stop: list[str], timeout: float) -> Completion:
        """Queue a generation; raises :class:`Overloaded` when ``max_queue`` are waiting or running."""
        with self._lock:
            if self._stopping:
                raise Retired(f"the engine of {self.dir} was replaced")
            self._check_room()
            self._admitted += 1
        loop = asyncio.get_running_loop()
        done = Completion(request, stop, time.monotonic() + timeout, loop, asyncio.Queue())
        self._inbox.put(("submit", done))
        self._wake.set()
        return done

    def _check_room(self) -> None:
        """Under ``_lock``: :class:`Overloaded` (counted as a 429) when ``max_queue`` are admitted."""
        if self._admitted >= self.max_queue:
            self.metrics.requests.labels(status="429").inc()
            raise Overloaded(f"{self._admitted} requests are queued or running (max_queue {self.max_queue})")

    def cancel(self, completion: Completion) -> None:
        """The client left: free the request's batch row at the next step."""
        self._inbox.put(("cancel", completion))
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self._admitted

    # --- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:  # a bug must not leave every client waiting on a dead thread
                log.exception("engine step failed; ending the requests in flight")
                for done in list(self._live.values()):
                    if not done.generation.done:
                        self.batcher.cancel(done.generation)
                    self._finish(done, "error")
                self.batcher = self._new_batcher()
            finally:
                self._deliver()

    def _post(self, done: Completion, event: tuple[str, str]) -> None:
        """Queue an event for ``done``'s client; :meth:`_deliver` hands a step's events over at once."""
        self._outbox.setdefault(done.loop, []).append((done.events, event))

    def _deliver(self) -> None:
        """One wake-up of each request loop per step, not one per token (each is a syscall and a GIL hand-over)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these events
                log.debug("dropped %d events for a closed event loop", len(items))

    def _iterate(self) -> None:
        self._take_inbox()
        self._expire()
        if not self.batcher.active:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        events = self.batcher.step()
        self.metrics.batch_size.observe(len(self.batcher.running) or 1)
        tokens = 0
        for gen, token in events:
            done = self._live.get(gen.id)
            if done is not None:
                tokens += token is not None
                self._on_token(done, gen, token)
        self.metrics.tokens.inc(tokens)  # once a step: a counter's lock per token shows at 16 rows

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, done = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                done.generation = self.batcher.submit(done.request)
                self._live[done.generation.id] = done
                if done.generation.done:  # max_tokens 0
                    self._finish(done, done.generation.finish_reason)
            elif done.generation is not None and not done.generation.done:
                self.batcher.cancel(done.generation)

    def _expire(self) -> None:
        now = time.monotonic()
        for done in list(self._live.values()):
            if now > done.deadline and not done.generation.done:
                self.batcher.cancel(done.generation)
                self._finish(done, "timeout")

    def _on_token(self, done: Completion, gen: Generation, token: int | None) -> None:
        if token is not None:
            if done.first_token_at is None:
                done.first_token_at = time.monotonic()
                self.metrics.time_to_first_token.observe(done.first_token_at - done.submitted)
            piece = done.detokenizer.step(self.tokenizer, token)
            if piece:
                done.text += piece
                if self._stopped(done):
                    return
                self._send_text(done, hold=done.hold)
        if gen.done and gen.id in self._live:
            # The whole text once more: bytes the stream held back (no whole character yet) end as U+FFFD.
            done.text = self.tokenizer.decode(gen.tokens)
            if self._stopped(done):
                return
            self._send_text(done)
            self._finish(done, gen.finish_reason)

    def _stopped(self, done: Completion) -> bool:
        """Whether ``done``'s text holds a stop string; if so, the text up to it is sent and the request ends."""
        cut = _first_stop(done.text, done.stop)
        if cut is None:
            return False
        done.text = done.text[:cut]
        self._send_text(done)
        self.batcher.cancel(done.generation)
        self._finish(done, "stop")
        return True

    def _send_text(self, done: Completion, hold: int = 0) -> None:
        """Send the text not sent yet, keeping back ``hold`` characters that could start a stop string."""
        end = len(done.text) - hold
        if end > done.sent:
            self._post(done, ("token", done.text[done.sent : end]))
            done.sent = end

    def _finish(self, done: Completion, reason: str) -> None:
        self._live.pop(done.generation.id, None)
        latency = time.monotonic() - done.submitted
        self.metrics.latency.observe(latency)
        status = {"timeout": "504", "cancelled": "499", "error": "500"}.get(reason, "200")
        self.metrics.requests.labels(status=status).inc()
        with self._lock:  # counted before it leaves the queue: an empty queue has its metrics
            self._admitted -= 1
        self._post(done, ("end", reason))


BACKENDS = ("onnx", "torch")
# fp32, not INT8: onnxruntime's dynamic INT8 quantizes a step's activations with one scale
# for the whole batch, so in INT8 a request's greedy tokens depend on the requests beside it
# (on the demo model 7 of 16 differed from the same request alone). fp32 rows are computed
# independently: a request gets the tokens it would get alone. INT8 stays a choice (faster).
ONNX_DEFAULT_PRECISION = "fp32"


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token stands for (at least 1).

    Measured on each token's own decoding: a token holding part of a character decodes to
    U+FFFD, 3 bytes for at most 3 of its own, so the figure never falls short of the truth.
    Special tokens count with their text: a prompt may spell one.
    """
    pieces = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())], skip_special_tokens=False)
    return max(1, max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1))


def load_lm(
    export: ExportedModel, backend: str, precision: str | None, device: str, threads: int | None
) -> tuple[Callable[[int], BatchCache], str, str]:
    """How to make a batch cache of n rows on the backend's model, the precision it runs in, and which graph.

    ``onnx``: onnxruntime's CPU provider (``fp32`` by default, batch-invariant, see
    ``ONNX_DEFAULT_PRECISION``; no torch needed), its idle
    threads not spinning (they would take the core the HTTP loop needs). The export's
    serving graph (KV cache updated in place, :class:`model.onnx_generate.SlotCache`) where
    it has one of the precision; otherwise (``int4``, or an export from before serving
    graphs) ``model*.onnx`` with the batch left-padded (:class:`model.batching.PaddedCache`).
    ``threads`` defaults to all cores but one: the HTTP loop and the clients' streams need a
    core too, and an intra-op thread that loses its core stalls every operator it shares.
    ``torch``: the export's Hugging Face weights on ``device`` (``cuda`` for a GPU; ``bf16``
    there by default, ``fp32`` on CPU), the caches kept on the device.
    """
    threads = threads or max(1, (os.cpu_count() or 2) - 1)  # one core stays with the HTTP loop
    if backend == "onnx":
        if device != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU; serve a GPU ({device}) with --backend torch")
        precision = precision or ONNX_DEFAULT_PRECISION
        serving = export.serving_graph(precision)
        if serving is not None:
            graph = ServingGraph(serving, threads, spin=False)
            return graph.cache, precision, f"{serving.name} (in-place KV cache)"
        path = export.graph(precision)
        lm = OnnxLM(path, threads, spin=False)
        return lambda rows: PaddedCache(lm), precision, f"{path.name} (padded KV cache)"
    if backend == "torch":
        import torch

        from model.torch_lm import TorchLM  # torch only where it is asked for

        torch.set_num_threads(threads)
        lm = TorchLM.from_export(export, device, precision)
        return lambda rows: PaddedCache(lm, lm.ops), lm.precision, "hf/ (torch)"
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def _put_all(items: list[tuple[asyncio.Queue, tuple[str, str]]]) -> None:
    for events, event in items:
        events.put_nowait(event)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def usage(completions: list[Completion]) -> dict[str, int]:
    """OpenAI's ``usage`` over a request's completions: prompt, generated and total tokens."""
    gens = [c.generation for c in completions if c.generation is not None]
    prompt, completion = sum(g.prompt_tokens for g in gens), sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def np_seed(seed: int | None) -> int:
    """A request's seed, or a fresh one (the OpenAI API samples differently each call without one)."""
    return int(seed) if seed is not None else int(np.random.default_rng().integers(0, 2**31 - 1))
