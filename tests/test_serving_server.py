"""The HTTP server on loopback: completions, streaming, every bad request, back-pressure and a
bounded load test."""

import asyncio
import json

import httpx
import pytest

from openmythos.data.tokenizer import ByteTokenizer
from openmythos.serving import Engine
from openmythos.serving.engine import QueueFull
from openmythos.serving.server import Limits, create_app
from tests.conftest import small_model


@pytest.fixture
def app():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=64), tokenizer=tok,
                    max_batch=4, max_queue=8)
    return create_app(engine, "tiny", Limits(max_tokens=32, max_body_bytes=4096, timeout_s=30))


async def _call(app, fn):
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await fn(client)


def call(app, fn):
    return asyncio.run(_call(app, fn))


def test_completion_health_models(app):
    async def go(client):
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0})
        h = await client.get("/health")
        m = await client.get("/v1/models")
        return r, h, m

    r, h, m = call(app, go)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["loops_executed"] > 0
    assert h.json()["status"] == "ok" and m.json()["data"][0]["id"] == "tiny"
    assert isinstance(m.json()["data"][0]["created"], int)


def test_a_model_not_served_here_is_a_404(app):
    asked = {"prompt": "hi", "max_tokens": 2}
    assert call(app, lambda c: c.post("/v1/completions", json={**asked, "model": "tiny"})).status_code == 200
    r = call(app, lambda c: c.post("/v1/completions", json={**asked, "model": "gpt-4"}))
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_openai_fields_at_their_neutral_values_are_accepted(monkeypatch):
    # what OpenAI client libraries send by default
    engine = _engine(max_batch=4, max_queue=8)
    asked, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, params, cb: asked.append(params) or submit(ids, params, cb))
    app = create_app(engine, "tiny", Limits(max_tokens=32, max_body_bytes=4096, timeout_s=30))
    neutral = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "presence_penalty": 0,
               "frequency_penalty": 0.0, "user": "someone", "stream_options": {"include_usage": True},
               "temperature": None, "top_p": None, "max_tokens": None, "logit_bias": {}, "suffix": None}
    r = call(app, lambda c: c.post("/v1/completions", json={"prompt": "hi", **neutral}))
    assert r.status_code == 200, r.text
    nulls = {k: None for k in ("n", "echo", "presence_penalty", "frequency_penalty", "stream")}
    assert call(app, lambda c: c.post("/v1/completions", json={"prompt": "hi", **nulls})).status_code == 200
    # null max_tokens, temperature and top_p: the defaults (the completion itself is sampled and
    # may stop early at EOS, so its length says nothing)
    assert (asked[0].max_tokens, asked[0].temperature, asked[0].top_p) == (16, 1.0, None)


def test_list_of_prompts_and_n_loops(app):
    async def go(client):
        return await client.post("/v1/completions", json={"prompt": ["a", "bc"], "max_tokens": 3,
                                                          "temperature": 0, "n_loops": 1})

    body = call(app, go).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["loops_executed"] == (1 + 2) + 2 * 2  # prompts, then 2 decodes each


def test_streaming_matches_the_plain_completion(app):
    async def go(client):
        plain = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 6, "temperature": 0})
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "ab", "max_tokens": 6, "temperature": 0, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        return plain, lines

    plain, lines = call(app, go)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.json()["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("payload,field", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n_loops": 0}, "n_loops"),
    ({"prompt": "x", "n_loops": 500}, "n_loops"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x" * 200, "max_tokens": 8}, "prompt"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": ["a"] * 13}, "prompt"),  # more than the engine's rows and queue could ever hold
    ({"prompt": "x", "temperature": 10**400}, "temperature"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 5}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
])
def test_bad_requests_name_the_field(app, payload, field):
    r = call(app, lambda c: c.post("/v1/completions", json=payload))
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert r.json()["error"]["param"] in (field, None)


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "x", "temperature": 1e999}', "temperature"),  # JSON's float overflows to inf
    (b'{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate, which no tokenizer encodes
    (b'{"prompt": ["ok", "\\ud800"]}', "prompt[1]"),
])
def test_values_only_raw_json_can_carry_are_refused_by_name(app, body, field):
    r = call(app, lambda c: c.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field.split("[")[0], r.text
    assert field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("payload, message", [
    ({"prompt": ["a", 5]}, "invalid 'prompt[1]': Input should be a valid string, got 5"),
    ({"prompt": "x", "stop": ["a", None]}, "invalid 'stop[1]': Input should be a valid string, got null"),
    ({"prompt": "x", "temperature": -1}, "invalid 'temperature': Input should be greater than or equal to 0, got -1.0"),
    ({"prompt": "x", "max_tokens": "x" * 200}, 'got "xxxxxxxx'),
    ({"max_tokens": 2}, "missing field 'prompt'"),
    ({"prompt": ["a", "x" * 200], "max_tokens": 8}, "prompt[1] is 200 tokens; with max_tokens=8 at most 56 fit"),
])
def test_a_bad_value_is_named_with_its_path_and_value(app, payload, message):
    r = call(app, lambda c: c.post("/v1/completions", json=payload))
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert len(r.json()["error"]["message"]) < 200  # a long value is cut short


def test_a_stop_string_that_is_not_valid_unicode_is_refused(app):
    body = b'{"prompt": "x", "stop": ["ok", "\\ud800"]}'
    r = call(app, lambda c: c.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    assert "lone surrogate" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_says_why(app):
    async def go(client):
        form = await client.post("/v1/completions", content=b'{"prompt": "hi"}',
                                 headers={"content-type": "application/x-www-form-urlencoded"})
        latin1 = await client.post("/v1/completions", content='{"prompt": "caf\xe9"}'.encode("latin-1"),
                                   headers={"content-type": "application/json"})
        return form, latin1

    form, latin1 = call(app, go)
    assert form.status_code == 415, form.text
    for kind in ("text/json", "application/jsonx"):  # not what FastAPI parses as JSON
        r = call(app, lambda c, kind=kind: c.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": kind}))
        assert r.status_code == 415, (kind, r.text)
    for kind in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        r = call(app, lambda c, kind=kind: c.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                                       headers={"content-type": kind}))
        assert r.status_code == 200, (kind, r.text)
    empty = call(app, lambda c: c.post("/v1/completions", content=b"", headers={"content-type": "application/json"}))
    assert empty.status_code == 400 and "body is empty" in empty.json()["error"]["message"], empty.text
    assert "Content-Type must be application/json, got 'application/x-www-form-urlencoded'" in form.text
    assert latin1.status_code == 400 and "UTF-8" in latin1.json()["error"]["message"], latin1.text


def test_malformed_json_and_oversized_body(app):
    async def go(client):
        bad = await client.post("/v1/completions", content=b"{not json",
                                headers={"content-type": "application/json"})
        big = await client.post("/v1/completions", content=b"{" + b" " * 5000 + b"}",
                                headers={"content-type": "application/json"})
        return bad, big

    bad, big = call(app, go)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    assert big.status_code == 413


def test_a_chunked_body_past_the_limit_is_refused(app):
    async def chunks():  # no Content-Length: the size shows only as the body streams in
        for _ in range(5):
            yield b" " * 1000

    async def go(client):
        big = await client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        small = await client.post("/v1/completions", content=_one(b'{"prompt": "hi", "max_tokens": 2}'),
                                  headers={"content-type": "application/json"})
        return big, small

    big, small = call(app, go)
    assert "content-length" not in big.request.headers
    assert big.status_code == 413 and "4096 bytes" in big.json()["error"]["message"]
    assert small.status_code == 200, small.text


async def _one(data: bytes):
    yield data


def test_a_prompt_past_the_servers_own_cap_is_told_so():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=64), tokenizer=tok)
    app = create_app(engine, "tiny", Limits(max_prompt_tokens=10))
    r = call(app, lambda c: c.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 4}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "prompt is 20 tokens, past this server's max_prompt_tokens=10" in r.json()["error"]["message"]


def test_max_tokens_beyond_the_context_names_max_tokens():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=64), tokenizer=tok, max_batch=1)
    r = call(create_app(engine, "tiny", Limits(max_tokens=512)),
             lambda c: c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "context of 64 tokens" in r.json()["error"]["message"]


def test_an_engine_failure_is_a_500_and_the_server_serves_on(monkeypatch):
    tok = ByteTokenizer()
    model = small_model(vocab_size=tok.vocab_size, max_seq_len=64)
    engine = Engine(model, tokenizer=tok, max_batch=1)
    app = create_app(engine, "tiny", Limits(max_tokens=8, timeout_s=30))
    forward, failures = type(model).forward, iter([RuntimeError("injected")] * 2)

    def flaky(self, *args, **kwargs):
        for error in failures:
            raise error
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky)

    async def go(client):
        plain = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        async with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2,
                                                                   "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        after = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        return plain, lines, after

    plain, lines, after = call(app, go)
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
    assert json.loads(lines[0][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
    assert after.status_code == 200, after.text


def test_a_stream_past_its_deadline_says_so():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=64), tokenizer=tok, max_batch=1)
    app = create_app(engine, "tiny", Limits(max_tokens=32, timeout_s=0.0))

    async def go(client):
        async with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 30,
                                                                   "stream": True}) as r:
            return [line async for line in r.aiter_lines() if line.startswith("data: ")]

    # bounded: a stream that misses its deadline of 0 s waits on its queue forever
    lines = call(app, lambda c: asyncio.wait_for(go(c), 10))
    assert "did not finish within" in json.loads(lines[-2][6:])["error"]["message"]
    assert lines[-1] == "data: [DONE]"


def test_a_client_gone_mid_completion_is_noticed_while_tokens_keep_coming():
    from openmythos.serving.engine import Event
    from openmythos.serving.server import _collect

    class Gone:
        async def is_disconnected(self):
            return True

    async def go():
        queue = asyncio.Queue()

        async def feed():  # a token every 10 ms, never a gap long enough to time out on
            while True:
                queue.put_nowait(Event("token", text="x"))
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(feed())
        try:
            return await asyncio.wait_for(_collect(queue, Gone()), 5)
        finally:
            feeder.cancel()

    assert asyncio.run(go()) is None


def test_the_app_serves_again_after_a_shutdown(app):
    ask = lambda c: c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert call(app, ask).status_code == 200
    assert call(app, ask).status_code == 200, "a second lifespan found the engine shut down"


def test_a_request_during_shutdown_is_a_503():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    app = create_app(engine, "tiny", Limits(max_tokens=32))

    async def go(client):
        engine.shutdown()  # what SIGTERM starts
        return await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})

    r = call(app, go)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


def test_requests_still_running_when_the_grace_period_ends_get_a_clean_answer(monkeypatch):
    """Past uvicorn's graceful shutdown it cancels the handlers: a plain request got a bare
    text 500, a stream was cut mid-chunk. The server now cancels them in the engine first."""
    import socket
    import threading
    import time

    import uvicorn

    from openmythos.serving.server import SHUT_DOWN, _Server

    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=256), tokenizer=tok, max_batch=2)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step()))  # 200 tokens: 10 s
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, "tiny", Limits(max_tokens=200)), host="127.0.0.1", port=port,
                            timeout_graceful_shutdown=3, log_level="warning")
    server = _Server(config, engine)
    threading.Thread(target=server.run, daemon=True).start()
    url, body, answers = f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x", "max_tokens": 200}, {}

    def plain():
        answers["plain"] = httpx.post(url, json=body, timeout=30)

    def stream():
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as r:
            answers["stream"] = [line for line in r.iter_lines() if line]

    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    clients = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for c in clients:
        c.start()
    while engine.stats()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.should_exit = True  # what uvicorn's SIGTERM handler sets
    for c in clients:
        c.join(30)
    assert answers["plain"].status_code == 503, answers["plain"].text
    assert answers["plain"].json()["error"]["message"] == SHUT_DOWN
    assert answers["stream"][-1] == "data: [DONE]" and SHUT_DOWN in answers["stream"][-2]
    assert len(answers["stream"]) > 2  # tokens had been streamed before the shutdown


def test_back_pressure_answers_429():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1, max_queue=1)
    app = create_app(engine, "tiny", Limits(max_tokens=32))

    async def go(client):
        reqs = [client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30}) for _ in range(6)]
        return await asyncio.gather(*reqs)

    codes = [r.status_code for r in call(app, go)]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


@pytest.mark.slow
def test_bounded_load_has_no_server_errors(app):
    async def go(client):
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                while True:  # a well-behaved client backs off on 429 (the time limit bounds it)
                    r = await client.post("/v1/completions", json={
                        "prompt": f"q{i}", "max_tokens": 1 + i % 8, "n_loops": 1 + i % 3,
                        "temperature": 0})
                    if r.status_code != 429:
                        return r
                    await asyncio.sleep(0.05)

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 300)

    codes = [r.status_code for r in call(app, go)]
    assert all(c < 500 for c in codes) and codes.count(200) == 200


# from a mutation review: the edges of each limit, stop strings as whole strings, refusals that
# name their field, and a request refused part way

def _engine(**kwargs):
    tok = ByteTokenizer()
    return Engine(small_model(vocab_size=tok.vocab_size, max_seq_len=64), tokenizer=tok, **kwargs)


@pytest.mark.parametrize("payload, limits", [
    ({"prompt": "x" * 56, "max_tokens": 8}, Limits()),  # exactly fills the context of 64
    ({"prompt": "x" * 10, "max_tokens": 1}, Limits(max_prompt_tokens=10)),
    ({"prompt": "x", "max_tokens": 1, "n_loops": 3}, Limits()),  # the engine's max_loops
    ({"prompt": "x", "max_tokens": 1, "stop": ["s"] * 16}, Limits()),  # MAX_STOPS
    ({"prompt": "", "max_tokens": 1}, Limits()),  # an empty prompt starts from EOS
])
def test_a_request_exactly_at_a_limit_is_served(payload, limits):
    r = call(create_app(_engine(max_batch=1), "tiny", limits), lambda c: c.post("/v1/completions", json=payload))
    assert r.status_code == 200, r.text


def test_a_body_exactly_at_the_size_limit_is_read(app):
    body = json.dumps({"prompt": "hi", "max_tokens": 1, "user": ""}).encode()
    body = body[:-2] + b" " * (4096 - len(body)) + body[-2:]  # padded inside the object
    assert len(body) == 4096
    r = call(app, lambda c: c.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("payload, field, message", [
    ({"prompt": "x", "max_tokens": 64}, "max_tokens", "max_tokens=64 leaves no room for a prompt in the context of 64"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt", "stream supports a single prompt"),
    ({"prompt": "x", "top_k": 0}, "top_k", "invalid 'top_k': Input should be greater than or equal to 1, got 0"),
    ({"prompt": "x", "logit_bias": {"50": 10}}, "logit_bias", "invalid 'logit_bias'"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop", "invalid 'stop': at most 16 stop strings, not 17"),
    ({"prompt": ["a"] * 3}, "prompt", "3 prompts, but at most 2 fit (what this server can admit at once: "
                                      "a batch of 1 and a queue of 1)"),
    ({"prompt": ["a"] * 3}, "prompt", "3 prompts, but at most 2 fit (2 per request)"),
])
def test_a_refusal_names_the_field_at_fault(payload, field, message):
    limits = Limits(max_tokens=512, max_batch_prompts=2 if "per request" in message else 16)
    app = create_app(_engine(max_batch=1, max_queue=1 if "a queue of" in message else 8), "tiny", limits)
    r = call(app, lambda c: c.post("/v1/completions", json=payload))
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert message in r.json()["error"]["message"], r.text
    assert "Value error" not in r.json()["error"]["message"]  # pydantic's prefix, not ours


@pytest.mark.parametrize("stop, stops", [("ab", ("ab",)), (["ab", "c"], ("ab", "c")), (None, ())])
def test_stop_strings_reach_the_engine_whole(stop, stops, monkeypatch):
    """A single stop string is one stop, not one per character."""
    engine = _engine(max_batch=1)
    seen, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, params, cb: (seen.append(params.stop), submit(ids, params, cb))[1])
    r = call(create_app(engine, "tiny"), lambda c: c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stop": stop}))
    assert r.status_code == 200 and seen == [stops], r.text


def test_a_seed_makes_a_sampled_completion_repeat():
    """Two requests on one engine (whose global generator moves on between them) sample the
    same text under one seed."""
    ask = {"prompt": "x", "max_tokens": 8, "temperature": 2.0, "seed": 7}

    async def go(client):
        return [(await client.post("/v1/completions", json=ask)).json()["choices"][0]["text"] for _ in range(2)]

    first, second = call(create_app(_engine(max_batch=1), "tiny"), go)
    assert first == second


def test_a_list_refused_part_way_leaves_none_of_its_prompts_in_the_engine(monkeypatch):
    """Prompt 2 of 2 finds the queue full: the 429 must cancel prompt 1, which was already
    submitted, or it runs on with no one to answer, holding a row."""
    engine = _engine(max_batch=1)
    submitted, submit = [], engine.submit

    def full_on_the_second(ids, params, cb):
        if submitted:
            raise QueueFull("every row is taken")
        submitted.append(submit(ids, params, cb))
        return submitted[-1]

    async def go(client):  # read before the app's shutdown cancels every request anyway
        r = await client.post("/v1/completions", json={"prompt": ["a", "b"]})
        return r, [req.cancelled for req in submitted]

    monkeypatch.setattr(engine, "submit", full_on_the_second)
    r, cancelled = call(create_app(engine, "tiny"), go)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    assert cancelled == [True]


# from a mutation review of the serving paths: /health and /v1/models in full, a plain request's
# deadline, a client gone from a plain request or a stream, the stream's finish_reason, the
# app's shutdown and serve()'s settings

def _slow_engine(monkeypatch, max_batch, pause=0.05):
    """An engine whose every step takes `pause` seconds longer: a request of 30 tokens runs 1.5 s."""
    import time

    engine = _engine(max_batch=max_batch)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(pause), step()))
    return engine


def _recording(engine, monkeypatch):
    """The engine's requests, in the order they were submitted."""
    reqs, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, params, cb: reqs.append(submit(ids, params, cb)) or reqs[-1])
    return reqs


async def _asgi(app, payload, gone, spec="2.3"):
    """POST /v1/completions straight to the ASGI app (from a server speaking ASGI `spec`: 2.3 is
    uvicorn's), the client disconnecting once `gone` (an asyncio.Event) is set; returns the
    status and the body's chunks."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent, status = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        if sent:
            return sent.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message.get("body"):
            status.append(message["body"])

    await app(scope, receive, send)
    return status[0], status[1:]


def test_health_and_models_in_full(monkeypatch):
    """/health reports the engine's load (what a load balancer reads), /v1/models the list
    OpenAI's clients parse, created when the server started, not at each call."""
    import time
    from types import SimpleNamespace

    import openmythos.serving.server as server

    before = int(time.time())
    app = create_app(_engine(max_batch=4, max_queue=8), "tiny")
    monkeypatch.setattr(server, "time", SimpleNamespace(time=lambda: before + 1000, monotonic=time.monotonic))
    health, models = call(app, lambda c: asyncio.gather(c.get("/health"), c.get("/v1/models")))
    assert health.json() == {"status": "ok", "running": 0, "waiting": 0, "free_rows": 4}
    listed = models.json()
    created = listed["data"][0].pop("created")
    assert listed == {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "openmythos"}]}
    assert before <= created <= before + 2, "created is the server's start, not the time of the call"


def test_a_plain_request_past_its_deadline_is_a_504_and_frees_its_row(monkeypatch):
    """A completion that outlives timeout_s is a 504 (a gateway timeout, not a 500), and its
    request is cancelled in the engine rather than left running for no one."""
    engine = _slow_engine(monkeypatch, max_batch=1)
    reqs = _recording(engine, monkeypatch)

    async def go(client):  # read before the app's shutdown cancels every request anyway
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "temperature": 0})
        return r, [req.cancelled for req in reqs]

    r, cancelled = call(create_app(engine, "tiny", Limits(timeout_s=0.2)), go)
    assert r.status_code == 504, r.text
    assert r.json()["error"] == {"message": "the completion did not finish within 0.2 s", "type": "server_error",
                                 "param": None}
    assert cancelled == [True]


def test_a_client_gone_from_a_plain_request_frees_its_rows(monkeypatch):
    """A client that disconnects mid-completion gets its requests cancelled (every prompt of a
    list) and the handler ends with a 499, not a 500 and a traceback in the log."""
    engine = _slow_engine(monkeypatch, max_batch=2)
    reqs = _recording(engine, monkeypatch)
    app = create_app(engine, "tiny")

    async def go():
        gone = asyncio.Event()
        gone.set()  # the client is gone by the first check, half a second in
        async with app.router.lifespan_context(app):
            status, _ = await _asgi(app, {"prompt": ["a", "b"], "max_tokens": 30, "temperature": 0}, gone)
            return status, [req.cancelled for req in reqs], [len(req.generated) for req in reqs]

    status, cancelled, generated = asyncio.run(go())
    assert status == 499 and cancelled == [True, True]
    assert max(generated) < 30  # stopped part way


def test_a_client_gone_from_a_stream_frees_its_row(monkeypatch):
    """A streaming client that disconnects after its first chunk: the request is cancelled in
    the engine at once, its row free for the next one."""
    engine = _slow_engine(monkeypatch, max_batch=1)
    reqs = _recording(engine, monkeypatch)
    app = create_app(engine, "tiny")

    async def go():
        gone = asyncio.Event()
        async with app.router.lifespan_context(app):
            watcher = asyncio.create_task(_set_when(gone, lambda: reqs and reqs[0].generated))
            status, chunks = await asyncio.wait_for(
                _asgi(app, {"prompt": "a", "max_tokens": 30, "temperature": 0, "stream": True}, gone), 10)
            watcher.cancel()
            return status, chunks, reqs[0].cancelled

    status, chunks, cancelled = asyncio.run(go())
    assert status == 200 and cancelled
    assert b"[DONE]" not in b"".join(chunks)  # cut off part way, as the client left


async def _set_when(event, ready):
    while not ready():
        await asyncio.sleep(0.01)
    event.set()


def test_a_streams_chunks_say_why_it_ended_only_at_the_end(app):
    """OpenAI's clients read finish_reason from the chunks: null until the last, which says
    why the completion ended ("length") and carries the usage; every chunk has one id."""
    async def go(client):
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "ab", "max_tokens": 4, "temperature": 0, "stream": True}) as r:
            return [json.loads(line[6:]) for line in [line async for line in r.aiter_lines()]
                    if line.startswith("data: {")]

    chunks = call(app, go)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                                   "loops_executed": chunks[-1]["usage"]["loops_executed"]}


def test_the_apps_shutdown_cancels_what_is_still_running(monkeypatch):
    """When the app stops (its lifespan ends), a request still in the engine is cancelled, and
    the engine's thread has ended by the time the shutdown returns."""
    import threading

    from openmythos.serving.engine import SamplingParams

    engine = _slow_engine(monkeypatch, max_batch=1)
    app, events, threads = create_app(engine, "tiny"), [], []

    async def go():
        async with app.router.lifespan_context(app):
            threads.extend(t for t in threading.enumerate() if t.name == "openmythos-engine")
            engine.submit([1, 2], SamplingParams(max_tokens=30), events.append)
            while not engine.stats()["running"]:
                await asyncio.sleep(0.01)

    asyncio.run(go())
    assert events and events[-1].kind == "done" and events[-1].finish_reason == "cancelled"
    assert threads and not any(t.is_alive() for t in threads)


def test_serve_runs_the_app_with_its_address_limits_and_grace(monkeypatch):
    """serve() hands uvicorn the host, port and grace period it was given, and the app it runs
    applies the given limits."""
    import openmythos.serving.server as server

    servers, engine = [], _engine(max_batch=1)
    monkeypatch.setattr(server._Server, "run", lambda self: servers.append(self))
    server.serve(engine, "127.0.0.2", 8123, "tiny", Limits(max_tokens=3), grace_s=7)
    (s,) = servers
    assert (s.config.host, s.config.port, s.config.timeout_graceful_shutdown) == ("127.0.0.2", 8123, 7)
    assert s.engine is engine
    r = call(s.config.app, lambda c: c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}))
    assert r.status_code == 400 and "cap of 3" in r.json()["error"]["message"], r.text


def test_a_stream_waiting_in_the_queue_notices_its_client_left(monkeypatch):
    """Under an ASGI 2.4 server Starlette no longer watches for a disconnect while it streams:
    a stream still waiting for a row, which has sent nothing, must notice by itself that its
    client left and leave the queue, or it takes a row later and runs for no one."""
    from openmythos.serving.engine import SamplingParams

    engine = _slow_engine(monkeypatch, max_batch=1)
    app = create_app(engine, "tiny")

    async def go():
        gone = asyncio.Event()
        gone.set()
        async with app.router.lifespan_context(app):
            engine.submit([1, 2], SamplingParams(max_tokens=30), lambda ev: None)  # holds the one row
            reqs = _recording(engine, monkeypatch)
            status, chunks = await asyncio.wait_for(
                _asgi(app, {"prompt": "a", "max_tokens": 30, "temperature": 0, "stream": True}, gone, spec="2.4"), 10)
            return status, chunks, reqs[0].cancelled, len(reqs[0].generated)

    status, chunks, cancelled, generated = asyncio.run(go())
    assert status == 200 and cancelled and generated == 0 and chunks == []


def test_a_list_cut_short_by_the_shutdown_is_a_503(monkeypatch):
    """A shutdown that cancels one prompt of a list after another has finished: the request
    is a 503, not a 200 whose last choice ends "cancelled" part way."""
    import dataclasses

    from openmythos.serving.server import SHUT_DOWN

    engine = _slow_engine(monkeypatch, max_batch=2)
    submit, submitted = engine.submit, []

    def first_is_short(ids, params, cb):  # prompt 0 ends after one token, and the shutdown starts then
        if not submitted:
            params = dataclasses.replace(params, max_tokens=1)
            cb = lambda ev, cb=cb: (ev.kind == "done" and engine.shutdown(cancel=True), cb(ev))
        submitted.append(submit(ids, params, cb))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", first_is_short)
    r = call(create_app(engine, "tiny"), lambda c: c.post("/v1/completions", json={"prompt": ["a", "b"],
                                                                                   "max_tokens": 30, "temperature": 0}))
    assert r.status_code == 503 and r.json()["error"]["message"] == SHUT_DOWN, r.text
