"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, the `serve` extra).

POST /v1/completions (prompt: a string or a list of strings; stream: SSE ending in
`data: [DONE]`; `n_loops` is our extension and `usage.loops_executed` reports the compute),
GET /health, GET /v1/models. Every bad request gets a 4xx JSON error naming the field; a full
queue answers 429; a client that disconnects frees its slot; SIGTERM drains in-flight requests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from openmythos.data.tokenizer import checked_text
from openmythos.serving.engine import Engine, Event, QueueFull, SamplingParams


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # cap on a request's max_tokens
    max_body_bytes: int = 1 << 20
    timeout_s: float = 120.0
    max_batch_prompts: int = 16  # prompts in one request's list


MAX_STOPS = 16


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    n_loops: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    # OpenAI fields that clients send at their neutral values: accepted at those, refused by
    # name otherwise (one completion per prompt, no log-probabilities, no penalties)
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    stream_options: dict[str, bool] | None = None  # the last chunk carries usage anyway
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("n", "best_of", "logprobs", "echo", "presence_penalty", "frequency_penalty",
                     "logit_bias", "suffix")
    @classmethod
    def _neutral(cls, v, info):
        neutral = {"n": (1,), "best_of": (None, 1), "logprobs": (None,), "echo": (False,),
                   "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
                   "suffix": (None,)}[info.field_name]
        if v not in neutral:  # (strict types already keep a bool from passing for 0 or 1)
            raise ValueError(f"only {' or '.join(map(json.dumps, neutral))} is supported here")
        return v

    @field_validator("max_tokens", "temperature", "top_p", "n", "echo", "presence_penalty",
                     "frequency_penalty", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, v, info):  # as in OpenAI's API
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _int_is_a_float(cls, v):  # strict mode would refuse `1` where JSON means 1.0
        if isinstance(v, int) and not isinstance(v, bool):
            try:
                return float(v)
            except OverflowError:
                raise ValueError("must be a finite number") from None
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must hold at least one prompt")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):  # each is searched for at every token, on the engine's thread
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(v)}")
        for text in [v] if isinstance(v, str) else v or ():
            checked_text(text)  # a lone surrogate could never match decoded text
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json, as FastAPI decides whether to parse a body."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _field_name(loc: tuple) -> str:
    """pydantic's location as the client wrote it, without the union members' tags:
    ("body", "prompt", "list[str]", 1) -> "prompt[1]"."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part not in ("body", "str", "list[str]"):
            name += f".{part}" if name else part
    return name or "body"


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param}}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param), status_code=status)


ENGINE_FAILED = "the engine failed while running this request (see the server log)"
SHUT_DOWN = "the server shut down before this completion finished"


class _BodyLimit:
    """413 for a request body over `limit` bytes, whether Content-Length declares it or a chunked
    upload streams it: the body is read here, never past the limit, then handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.limit)
        chunks, size, more = [], 0, True
        while more and not too_big:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more, too_big = message.get("more_body", False), size > self.limit
        if too_big:
            return await _error(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the body once, then the client's own messages (disconnects)
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 400 (415 for a body that is not JSON) naming the first field at fault."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return _error(400, f"malformed JSON: {errors[0]['msg']}", None)
    content_type = request.headers.get("content-type", "")
    if errors[0]["loc"] == ("body",):
        if not _is_json(content_type):  # FastAPI's rule: it never parsed such a body
            return _error(415, f"Content-Type must be application/json, got {content_type!r}", None)
        if errors[0]["type"] == "missing":
            return _error(400, "the request body is empty: send a JSON object", None)
    # for a union (prompt: str | list[str]) the member that got furthest, e.g. ["a", 5] fails
    # at its item 1, not as "a valid string"
    first = max(errors, key=lambda e: len(e["loc"]))
    field = _field_name(first["loc"])
    if first["type"] == "extra_forbidden":
        return _error(400, f"unknown field {field!r}", field)
    if first["type"] == "missing":
        return _error(400, f"missing field {field!r}", field)
    if first["type"] == "value_error":  # our own validators' messages, which say what was wrong
        return _error(400, f"invalid {field!r}: {first['ctx']['error']}", field)
    got = json.dumps(first["input"], default=repr)
    got = got if len(got) <= 80 else got[:77] + "..."
    return _error(400, f"invalid {field!r}: {first['msg']}, got {got}", field)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors in our JSON error shape."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return _error(400, "the body could not be parsed as JSON (is it UTF-8?)", None)
    return _error(exc.status_code, str(exc.detail))


def create_app(engine: Engine, model_name: str = "openmythos", limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer to turn prompts into tokens")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.stopping = False  # an app may start again after a shutdown (a second test client)
        thread = threading.Thread(target=engine.serve_forever, name="openmythos-engine", daemon=True)
        thread.start()
        try:
            yield
        finally:  # uvicorn has stopped taking requests and drained the open ones (SIGTERM)
            engine.shutdown(cancel=True)
            await asyncio.to_thread(thread.join, 30)

    app = FastAPI(title="OpenMythos", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    started = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "openmythos"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != model_name:
            return _error(404, f"model {body.model!r} is not served here: this server serves {model_name!r}",
                          "model")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        refusal = _over_limits(body, len(prompts), engine, limits)
        if refusal is not None:
            return refusal
        encoded, context_room = [], engine.max_len - body.max_tokens
        for i, text in enumerate(prompts):
            where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            try:  # off the event loop: a long prompt takes a second, and every client would wait
                ids = await asyncio.to_thread(tokenizer.encode, text) or [tokenizer.eos_id]
            except ValueError as e:  # a lone surrogate, which JSON can carry
                return _error(400, f"{where}: {e}", "prompt")
            encoded.append(ids)
            if len(ids) > limits.max_prompt_tokens:
                return _error(400, f"{where} is {len(ids)} tokens, past this server's max_prompt_tokens="
                                   f"{limits.max_prompt_tokens}", "prompt")
            if len(ids) > context_room:
                return _error(400, f"{where} is {len(ids)} tokens; with max_tokens={body.max_tokens} "
                                   f"at most {context_room} fit the context", "prompt")
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                                top_k=body.top_k, top_p=body.top_p if body.top_p < 1 else None,
                                stop=body.stops(), n_loops=body.n_loops, seed=body.seed)
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in prompts]
        reqs = _submit_all(engine, encoded, params, queues)
        if isinstance(reqs, JSONResponse):
            return reqs
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream(engine, reqs[0], queues[0], request, cid, created,
                                             model_name, limits.timeout_s),
                                     media_type="text/event-stream")
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(_collect(q, request) for q in queues)), limits.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"the completion did not finish within {limits.timeout_s} s", None)
        finally:
            for r in reqs:
                engine.cancel(r)  # no-op for finished requests; frees slots on timeout/disconnect
        if any(r is None for r in results):
            return _error(499, "client closed the request", None)
        if any(reason == "error" for _, reason, _ in results):
            return _error(500, ENGINE_FAILED)
        if engine.stopping and any(reason == "cancelled" for _, reason, _ in results):
            return _error(503, SHUT_DOWN)
        usage = {k: sum(u[k] for _, _, u in results) for k in results[0][2]}
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                            for i, (text, reason, _) in enumerate(results)],
                "usage": usage}

    return app


def _over_limits(body: CompletionRequest, n_prompts: int, engine: Engine, limits: Limits) -> JSONResponse | None:
    """The refusal of a request past this server's limits, before its prompts are tokenized."""
    most = min(limits.max_batch_prompts, engine.max_batch + engine.max_queue)  # more could never all be admitted
    if n_prompts > most:
        why = (f"{limits.max_batch_prompts} per request" if most == limits.max_batch_prompts else
               f"what this server can admit at once: a batch of {engine.max_batch} and a queue of {engine.max_queue}")
        return _error(400, f"{n_prompts} prompts, but at most {most} fit ({why})", "prompt")
    if body.max_tokens > limits.max_tokens:
        return _error(400, f"max_tokens={body.max_tokens} exceeds the cap of {limits.max_tokens}", "max_tokens")
    if body.max_tokens >= engine.max_len:
        return _error(400, f"max_tokens={body.max_tokens} leaves no room for a prompt in the context "
                           f"of {engine.max_len} tokens", "max_tokens")
    if body.n_loops is not None and body.n_loops > engine.max_loops:
        return _error(400, f"n_loops={body.n_loops} exceeds this server's {engine.max_loops} (its "
                           "--max-loops: more loops need a server started with a larger one)", "n_loops")
    if body.stream and n_prompts > 1:
        return _error(400, "stream supports a single prompt", "prompt")
    return None


def _submit_all(engine: Engine, encoded: list[list[int]], params: SamplingParams,
                queues: list[asyncio.Queue[Event]]) -> list | JSONResponse:
    """Every prompt of a request submitted, each one's events into its queue, or none at all
    (those already in are cancelled) and the refusal."""
    loop, reqs = asyncio.get_running_loop(), []
    try:
        for ids, q in zip(encoded, queues, strict=True):
            reqs.append(engine.submit(ids, params, lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev)))
    except (QueueFull, ValueError) as e:
        for r in reqs:
            engine.cancel(r)
        if isinstance(e, QueueFull):
            return _error(503 if engine.stopping else 429, f"server busy: {e}", None)
        return _error(400, str(e), "prompt")
    return reqs


async def _collect(queue: asyncio.Queue[Event], request: Request) -> tuple[str, str, dict] | None:
    parts, checked = [], time.monotonic()
    while True:
        try:
            ev = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            ev = None
        if time.monotonic() - checked >= 0.5:  # every half second, whether tokens arrive or not
            if await request.is_disconnected():
                return None
            checked = time.monotonic()
        if ev is None:
            continue
        if ev.kind == "done":
            return "".join(parts), ev.finish_reason, ev.usage
        parts.append(ev.text)


async def _stream(engine: Engine, req, queue: asyncio.Queue[Event], request: Request, cid: str,
                  created: int, model_name: str, timeout_s: float) -> AsyncIterator[str]:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                if time.monotonic() >= deadline:
                    yield _sse_error(504, f"the completion did not finish within {timeout_s} s")
                    return
                continue
            if ev.finish_reason == "error":
                yield _sse_error(500, ENGINE_FAILED)
                return
            if ev.finish_reason == "cancelled" and engine.stopping:
                yield _sse_error(503, SHUT_DOWN)
                return
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                     "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                  "finish_reason": ev.finish_reason}]}
            if ev.kind == "done":
                chunk["usage"] = ev.usage
                yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield f"data: {json.dumps(chunk)}\n\n"
    finally:
        engine.cancel(req)  # a client that went away frees its slot


def _sse_error(status: int, message: str) -> str:
    """An error in a stream that has already answered 200: an error event, then the end."""
    return f"data: {json.dumps(_error_body(status, message))}\n\ndata: [DONE]\n\n"


class _Server(uvicorn.Server):
    """uvicorn's server, which cancels the engine's requests a moment before its graceful
    shutdown runs out: they then end as every cancelled request does (a 503, or an error event
    and `[DONE]` in a stream) instead of being cut off mid-response when uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        grace = self.config.timeout_graceful_shutdown
        timer = asyncio.get_running_loop().call_later(max(grace - 2, 0), self.engine.shutdown, True)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "openmythos",
          limits: Limits | None = None, grace_s: float = 30) -> None:
    config = uvicorn.Config(create_app(engine, model_name, limits), host=host, port=port,
                            timeout_graceful_shutdown=grace_s, log_level="info")
    _Server(config, engine).run()
