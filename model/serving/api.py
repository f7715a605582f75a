"""The OpenAI-compatible HTTP API over :class:`model.serving.engine.Engine` (FastAPI, run by uvicorn).

Routes: ``POST /v1/completions`` (a prompt or a list of them; ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``stream`` as server-sent events, ``usage``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Everything a client sends is untrusted: the body is read up to ``max_body_bytes`` (413
past it), parsed as JSON (400), validated field by field (400 naming the field, in the
OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``), and checked
against the context window before any work is queued. A wrong or missing key is 401, a
full queue 429 with ``Retry-After``, a request past its deadline 504 (or, streaming, an
error event). A client that disconnects frees its batch row at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.batching import GenerationRequest
from model.serving.engine import Engine, Overloaded, Retired, np_seed, usage
from model.serving.switch import ServedModel

MAX_PROMPTS = 16
MAX_STOPS = 4


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that this server implements (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = Field(..., description="One prompt, or a list of them (one choice each).")
    max_tokens: int = Field(16, ge=0, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Choices per prompt: only 1.")
    stream_options: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, got {len(value)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > 64 for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop strings of 1 to 64 characters")
        return stops


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    model: Engine | ServedModel,
    model_id: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    timeout: float = 60.0,
) -> FastAPI:
    """The app over one engine, or over a :class:`ServedModel` whose engine a follower may switch."""
    served = model if isinstance(model, ServedModel) else ServedModel(model)
    app = FastAPI(title="lmforge serve", docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        sent = request.headers.get("authorization", "")
        return hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode())

    @app.get("/health")
    async def health() -> dict:
        engine = served.engine
        return {"status": "ok", "model": model_id, "version": served.version, "queue": engine.queue_depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = served.engine
        return PlainTextResponse(
            engine.metrics.render(engine.queue_depth).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong API key", kind="authentication_error")
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "lmforge"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if not authorized(request):
            return error(
                401, "missing or wrong API key (send Authorization: Bearer <key>)", kind="authentication_error"
            )
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return error(413, f"the request body is larger than {max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"the body is not valid JSON: {str(e)[:200]}")
        if not isinstance(payload, dict):
            return error(400, "the body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(payload)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return error(400, f"{param}: {first['msg']}", param=str(first["loc"][0]) if first["loc"] else None)
        if req.model not in (None, model_id):
            return error(404, f"model {req.model!r} is not served here (it serves {model_id!r})", "model")
        for _attempt in range(3):  # a model switch between taking the engine and submitting: take the new one
            engine = served.engine
            started = []
            try:
                engine.refuse_if_full()  # before tokenizing: a full server spends nothing on a refusal
                plans = _plan(engine, req)
                if isinstance(plans, JSONResponse):
                    return plans
                for plan in plans:
                    started.append(engine.submit(plan, req.stop, timeout))
                break
            except (Overloaded, Retired) as e:
                for done in started:
                    engine.cancel(done)
                if isinstance(e, Overloaded):
                    return error(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"})
        else:
            return error(503, "the model is being switched; retry", kind="server_error", headers={"Retry-After": "1"})
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(engine, started, rid, created, model_id, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _collect(engine, request, started, rid, created, model_id)

    return app


def _plan(engine: Engine, req: CompletionRequest) -> list[GenerationRequest] | JSONResponse:
    """One generation per prompt, encoded by ``engine``'s tokenizer; a 400 naming the field if one cannot be."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    plans = []
    for text in prompts:
        at_least = engine.tokens_at_least(text)
        if at_least is not None:
            return error(400, f"prompt is at least {at_least} tokens; the context holds {engine.block_size}", "prompt")
        try:
            ids = engine.encode(text)
        except Exception:  # lone surrogates and other strings the tokenizer cannot take
            return error(400, "prompt is not valid Unicode text", "prompt")
        if len(ids) > engine.block_size:
            return error(400, f"prompt is {len(ids)} tokens; the context holds {engine.block_size}", "prompt")
        room = engine.block_size - len(ids) + 1
        if req.max_tokens > room:
            return error(
                400,
                f"max_tokens {req.max_tokens} does not fit: the prompt leaves room for {room} of "
                f"{engine.block_size} context tokens",
                "max_tokens",
            )
        plans.append(GenerationRequest(ids, req.max_tokens, req.temperature, 0, req.top_p, np_seed(req.seed)))
    return plans


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (a declared length past it is refused unread)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(engine: Engine, request: Request, started, rid: str, created: int, model_id: str):
    choices = []
    try:
        for index, done in enumerate(started):
            text, reason = "", None
            while reason is None:
                try:
                    kind, value = await asyncio.wait_for(done.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if kind == "token":
                    text += value
                else:
                    reason = value
            if reason == "timeout":
                return error(504, "the request passed its deadline before the generation finished", kind="timeout")
            if reason == "error":
                return error(500, "the engine failed on this batch; the server log says why", kind="server_error")
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason})
    except asyncio.CancelledError:
        for done in started:
            engine.cancel(done)
        raise
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": choices,
        "usage": usage(started),
    }


async def _stream(engine: Engine, started, rid: str, created: int, model_id: str, include_usage: bool):
    """Server-sent events: one chunk per piece of text, per choice as it comes, then ``[DONE]``."""

    def chunk(choices: list, **extra) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": model_id, "choices": choices}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    try:
        async for index, kind, value in _choice_events(started):
            if kind == "token":
                yield chunk([{"text": value, "index": index, "logprobs": None, "finish_reason": None}])
            elif value in ("timeout", "error"):
                message = "the request passed its deadline" if value == "timeout" else "the engine failed"
                failure = {"message": message, "type": value, "param": None, "code": None}
                yield f"data: {json.dumps({'error': failure})}\n\n"
            else:
                yield chunk([{"text": "", "index": index, "logprobs": None, "finish_reason": value}])
        if include_usage:
            yield chunk([], usage=usage(started))
        yield "data: [DONE]\n\n"
    finally:  # the client left mid-stream (or we are done): nothing keeps generating for nobody
        for done in started:
            engine.cancel(done)


async def _choice_events(started):
    """``(index, kind, value)`` of every choice's events as they come, each choice up to its end.

    One choice (the common case) awaits its queue directly: a task and an ``asyncio.wait``
    per token cost the HTTP loop more than the rest of a token's streaming (measured).
    """
    if len(started) == 1:
        events = started[0].events
        kind = "token"
        while kind == "token":
            kind, value = _with_piled_up_text(events, *await events.get())
            yield 0, kind, value
        return
    pending = {asyncio.ensure_future(done.events.get()): i for i, done in enumerate(started)}
    try:
        while pending:
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in finished:
                index = pending.pop(fut)
                events = started[index].events
                kind, value = _with_piled_up_text(events, *fut.result())
                if kind == "token":
                    pending[asyncio.ensure_future(events.get())] = index
                yield index, kind, value
    finally:
        for fut in pending:
            fut.cancel()


def _with_piled_up_text(events: asyncio.Queue, kind: str, value: str) -> tuple[str, str]:
    """A slow reader gets the text that piled up in one piece; an end event waits for the next round."""
    while kind == "token" and not events.empty():
        more_kind, more = events.get_nowait()
        if more_kind != "token":
            events.put_nowait((more_kind, more))  # the end comes back next round, after the text
            break
        value += more
    return kind, value
