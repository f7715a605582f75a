"""`lmforge serve`: a real uvicorn server on an exported model, driven by the openai client and by raw HTTP."""

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn

from model.onnx_generate import ExportedModel, OnnxGenerator
from model.serving.api import create_app
from model.serving.engine import ONNX_DEFAULT_PRECISION, Engine, Overloaded, max_token_bytes
from model.serving.switch import Follower, ServedModel
from tests.model.tiny import export_tiny
from tests.ports import free_port

KEY = "test-key"
NAME = "tiny"


class Running:
    """A uvicorn server in a thread, as `lmforge serve` runs it."""

    def __init__(self, engine: Engine | ServedModel, **kw):
        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, NAME, api_key=KEY, **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()

    def post(self, body, key: str | None = KEY, raw: bytes | None = None, path: str = "/v1/completions"):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}

    def post_oversized(self, size: int) -> int:
        """The status of a POST whose body is ``size`` bytes. The server answers 413 without reading
        it and closes; the client may still be sending (a broken pipe), and reads the answer then."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = b'{"prompt": "' + b"a" * size + b'"}'
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            return conn.getresponse().status
        finally:
            conn.close()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()


@pytest.fixture(scope="module")
def model_dir(tiny_export):
    return tiny_export[1].dir


@pytest.fixture(scope="module")
def served(model_dir):
    running = Running(Engine(model_dir, threads=1, max_batch=8).start())
    yield running
    running.close()


def alone(model_dir, prompt: str, max_tokens: int) -> str:
    """The prompt's greedy text from `lmforge generate`'s generator, one request alone, in the server's default precision."""
    return OnnxGenerator(model_dir, ONNX_DEFAULT_PRECISION, threads=1).generate(prompt, max_tokens, temperature=0.0)


def test_the_openai_client_completes_streams_and_lists_models(served, model_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt="the cat", max_tokens=8, temperature=0)
    assert out.choices[0].text == alone(model_dir, "the cat", 8)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens <= 8
    pieces = list(client.completions.create(model=NAME, prompt="the cat", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason
    both = client.completions.create(model=NAME, prompt=["the cat", "a dog"], max_tokens=5, temperature=0)
    assert [c.text for c in both.choices] == [alone(model_dir, "the cat", 5), alone(model_dir, "a dog", 5)]


def test_a_stop_string_cuts_the_text_before_it(served, model_dir):
    full = alone(model_dir, "the cat", 12)
    stop = full[4:7]
    status, out, _ = served.post({"prompt": "the cat", "max_tokens": 12, "temperature": 0, "stop": [stop]})
    assert status == 200 and out["choices"][0] == {
        "text": full[: full.index(stop)],
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_concurrent_requests_share_steps_and_get_their_single_request_tokens(served, model_dir):
    # By default the server runs the fp32 serving graph: rows of a batch are computed independently
    # (dynamic INT8 would quantize the whole batch's activations with one scale).
    assert (served.engine.precision, served.engine.graph) == ("fp32", "serve.onnx (in-place KV cache)")
    prompts = ["the cat", "a dog ran", "the mat", "park. the", "sat on", "the dog", "a cat", "ran to the park"]
    want = [alone(model_dir, p, 20) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: served.post({"prompt": p, "max_tokens": 20, "temperature": 0}), prompts))
    assert [g[1]["choices"][0]["text"] for g in got] == want
    metrics = served.metrics()
    one = float(
        next(line for line in metrics.splitlines() if line.startswith('lmforge_batch_size_bucket{le="1.0"}')).split()[
            -1
        ]
    )
    steps = float(
        next(line for line in metrics.splitlines() if line.startswith("lmforge_batch_size_count")).split()[-1]
    )
    assert steps > one  # some decode steps ran more than one sequence
    assert 'lmforge_requests_total{status="200"}' in metrics and "lmforge_time_to_first_token_seconds_count" in metrics


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": [1]}, 400, "temperature"),
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": 5}, 400, "prompt"),
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "the cat " * 40}, 400, "prompt"),
        ({"prompt": "the cat", "max_tokens": 500}, 400, "max_tokens"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_a_status_naming_the_field(served, body, status, param):
    got, out, _ = served.post(body)
    assert got == status and out["error"]["param"] == param and out["error"]["message"]


def test_a_prompt_too_big_for_the_context_is_refused_by_its_size(served):
    """Past ``max_prompt_bytes`` no encoding is needed (the message says "at least"); below, the count is exact."""
    engine = served.engine
    for size in (engine.max_prompt_bytes + 1, 900_000):
        status, out, _ = served.post({"prompt": "a" * size, "max_tokens": 1})
        assert status == 400 and out["error"]["param"] == "prompt"
        assert (
            f"at least {-(-size // (engine.max_prompt_bytes // engine.block_size))} tokens" in out["error"]["message"]
        )
    status, out, _ = served.post({"prompt": "the cat " * 40, "max_tokens": 1})
    assert status == 400 and "at least" not in out["error"]["message"]


def test_the_size_bound_never_refuses_a_prompt_that_fits(model_dir):
    """No token stands for more UTF-8 bytes than ``max_token_bytes`` says, in any script or spelling."""
    tokenizer = ExportedModel(model_dir).tokenizer
    most = max_token_bytes(tokenizer)
    rng = random.Random(3)
    texts = ["the cat sat on the mat. " * 50, "😀 emoji " * 40, "<|endoftext|>" * 30, "\u00e9" * 300]
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(400)) for _ in range(20)]
    texts += [" ".join(rng.choice(["cat", "the", "mat", "sat", "on"]) for _ in range(400)) for _ in range(20)]
    for text in texts:
        assert len(tokenizer.encode(text).ids) * most >= len(text.encode()), text[:40]


def test_nothing_a_client_sends_crashes_the_server(served):
    assert served.post(None, raw=b"{not json")[0] == 400
    assert served.post(None, raw=b"[1, 2]")[0] == 400
    assert served.post(None, raw=b'{"prompt": "\\ud800 lone surrogate"}')[0] in (200, 400)
    assert served.post(None, raw=b"\xff\xfe\x00garbage")[0] == 400
    assert served.post_oversized(2 << 20) == 413
    for text in ["😀 emoji", "\u202eRTL override", "zero\u200bwidth", "\x00nul", "é" * 10]:
        status, out, _ = served.post({"prompt": text, "max_tokens": 3, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] <= 3
    with urllib.request.urlopen(served.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_a_missing_or_wrong_key_is_401(served):
    assert served.post({"prompt": "x"}, key=None)[0] == 401
    assert served.post({"prompt": "x"}, key="wrong")[0] == 401
    req = urllib.request.Request(served.url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401


class SlowDecode:
    """The real batch cache, each decode step 0.1 s longer: the client's hang-up lands mid-generation
    (the tiny model would otherwise finish its 25 tokens before the server notices)."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def decode(self, ids):
        time.sleep(0.1)
        return self._cache.decode(ids)


def test_a_client_that_leaves_mid_stream_frees_its_slot(model_dir):
    import httpx

    engine = Engine(model_dir, threads=1, max_batch=8)
    real = engine.new_cache
    engine.new_cache = lambda rows: SlowDecode(real(rows))
    engine.batcher = engine._new_batcher()
    served = Running(engine.start())
    try:
        with httpx.stream(
            "POST",
            served.url + "/v1/completions",
            json={"prompt": "the cat", "max_tokens": 25, "temperature": 0, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # one event, then hang up
        deadline = time.monotonic() + 10
        while served.engine.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.engine.queue_depth == 0
        metrics = served.metrics()
    finally:
        served.close()
    assert 'lmforge_requests_total{status="499"}' in metrics  # counted as a client that left
    assert 'lmforge_requests_total{status="200"}' not in metrics


def test_a_full_queue_is_429_with_retry_after(model_dir):
    engine = Engine(model_dir, threads=1, max_queue=1)  # not started: the first request holds the only slot
    running = Running(engine)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(running.post, {"prompt": "the cat", "max_tokens": 4, "temperature": 0})
            deadline = time.monotonic() + 10
            while engine.queue_depth == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, out, headers = running.post({"prompt": "a dog", "max_tokens": 4})
            assert status == 429 and headers["retry-after"] == "1" and out["error"]["type"] == "rate_limit_error"
            # Refused before its prompt is looked at: a full server tokenizes nothing for a refusal.
            assert running.post({"prompt": "the cat " * 40, "max_tokens": 4})[0] == 429
            engine.start()  # the engine picks the first request up and finishes it
            assert first.result(timeout=30)[0] == 200
    finally:
        running.close()


def test_a_request_past_its_deadline_ends_with_504(model_dir):
    running = Running(Engine(model_dir, threads=1).start(), timeout=1e-9)
    try:
        status, out, _ = running.post({"prompt": "the cat", "max_tokens": 20, "temperature": 0})
        assert status == 504 and "deadline" in out["error"]["message"]
        assert running.engine.queue_depth == 0
    finally:
        running.close()


def test_admission_is_counted_not_guessed(model_dir):
    import asyncio

    from model.batching import GenerationRequest

    engine = Engine(model_dir, threads=1, max_queue=2)

    async def fill():
        engine.submit(GenerationRequest([0, 1], 2), [], 10)
        engine.submit(GenerationRequest([0, 1], 2), [], 10)
        with pytest.raises(Overloaded):
            engine.submit(GenerationRequest([0, 1], 2), [], 10)

    asyncio.run(fill())
    assert engine.queue_depth == 2


@pytest.mark.parametrize("stop", [[], ["zz"]])
def test_a_character_split_over_tokens_is_streamed_whole(model_dir, stop):
    """The tiny tokenizer spells '中' as three byte tokens: the stream sends the character once
    all three came (never U+FFFD, with or without stop strings); bytes of no whole character
    at the end are sent as the full decode has them."""
    import asyncio

    from model.batching import Generation, GenerationRequest
    from model.serving.engine import Completion

    engine = Engine(model_dir, threads=1)
    loop = asyncio.new_event_loop()
    try:

        def streamed(token_ids: list[int], reason: str) -> list[tuple[str, str]]:
            request = GenerationRequest([0], 8, 0.0)
            gen = Generation(len(engine._live) + 100, request)
            done = Completion(request, stop, time.monotonic() + 60, loop, asyncio.Queue())
            done.generation = gen
            engine._live[gen.id] = done
            for i, token in enumerate(token_ids):
                gen.tokens.append(token)
                if i == len(token_ids) - 1:
                    gen.finish_reason = reason
                engine._on_token(done, gen, token)
            outbox, engine._outbox = engine._outbox, {}
            return [event for _, event in outbox.get(loop, [])]

        han = engine.tokenizer.encode("中").ids
        cat = engine.tokenizer.encode(" cat").ids
        assert len(han) == 3  # a byte token each: the test is about characters split over tokens
        for tokens, text in ((cat + han + cat, " cat中 cat"), (cat + han[:2], " cat\ufffd")):
            events = streamed(tokens, "length")
            pieces = [value for kind, value in events if kind == "token"]
            assert "".join(pieces) == text and events[-1] == ("end", "length")
            assert not any("\ufffd" in piece for piece in pieces[:-1])  # only the last, at the very end
    finally:
        loop.close()


def test_serve_refuses_another_address_without_a_key(model_dir, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir.parent / "missing")]) == 2
    assert "not an exported lmforge model" in capsys.readouterr().err


def _stream_text(url: str, body: dict) -> str:
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    texts: dict[int, str] = {}
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return [texts[i] for i in sorted(texts)]


def test_a_model_switch_finishes_requests_in_flight_on_the_old_model(model_dir, tmp_path_factory):
    other = export_tiny(tmp_path_factory.mktemp("serve-other"), n_embd=48)[1].dir
    prompts = ["the cat", "a dog", "the mat", "ran to"] * 4
    # The old engine without batching: sixteen prompts of 25 tokens keep it busy through the switch.
    served_model = ServedModel(Engine(model_dir, threads=1, batching=False).start(), version="a", drain_grace=60)
    current = {"found": ("a", model_dir)}

    def load(directory):
        return Engine(directory, threads=1, max_batch=8)

    follower = Follower(served_model, lambda: current["found"], load, interval=3600)  # polled by hand here
    running = Running(served_model)
    try:
        old = served_model.engine
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_stream_text, running.url, {"prompt": prompts, "max_tokens": 25, "temperature": 0})
            deadline = time.monotonic() + 30
            while old.queue_depth == 0:
                assert time.monotonic() < deadline and not in_flight.done()
                time.sleep(0.005)
            current["found"] = ("b", other)
            assert follower.check()
            assert old.queue_depth > 0, "the request finished before the switch: the test would prove nothing"
            status, out, _ = running.post({"prompt": "the cat", "max_tokens": 10, "temperature": 0})
            assert status == 200 and out["choices"][0]["text"] == alone(other, "the cat", 10)
            assert in_flight.result(timeout=60) == [alone(model_dir, p, 25) for p in prompts]
        with urllib.request.urlopen(running.url + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["version"] == "b"
        deadline = time.monotonic() + 10
        while old._thread.is_alive():  # drained, then stopped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A version that does not load leaves the current model serving.
        current["found"] = ("c", tmp_path_factory.mktemp("empty"))
        assert not follower.check() and served_model.version == "b"
        assert running.post({"prompt": "a dog", "max_tokens": 3, "temperature": 0})[0] == 200
        assert served_model.switches == 1
    finally:
        running.close()


def test_the_torch_backend_serves_the_hf_weights_with_the_same_tokens(tiny_export, tmp_path):
    """`--backend torch` (the GPU path; here on CPU in fp32) batches like the ONNX engine and
    gives, request by request, the greedy tokens of the fp32 ONNX graph."""
    import shutil

    from model.hf import save_hf

    model, result, eot, _ = tiny_export
    directory = shutil.copytree(result.dir, tmp_path / "model")
    save_hf(model, directory / "hf", directory / "tokenizer.json", eot)
    engine = Engine(directory, backend="torch", threads=1, max_batch=8)
    assert (engine.backend, engine.precision, engine.device) == ("torch", "fp32", "cpu")
    running = Running(engine.start())
    try:
        prompts = ["the cat", "a dog ran", "the mat", "park. the", "sat on"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: running.post({"prompt": p, "max_tokens": 12, "temperature": 0}), prompts))
        want = [OnnxGenerator(directory, "fp32", threads=1).generate(p, 12, temperature=0.0) for p in prompts]
        assert [g[1]["choices"][0]["text"] for g in got] == want
    finally:
        running.close()


def test_a_backend_that_cannot_run_here_is_refused_by_name(model_dir):
    with pytest.raises(ValueError, match="onnx backend runs on the CPU"):
        Engine(model_dir, device="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine(model_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="precision must be one of"):
        Engine(model_dir, precision="bf16")  # an onnx precision is a file of the export
