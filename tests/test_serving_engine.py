"""The engine: greedy requests give the same tokens alone or among others, slots are freed,
chunked prefill is exact, per-request depth is honoured."""

import random
import threading

import pytest
import torch

from openmythos.data.tokenizer import ByteTokenizer
from openmythos.serving import Engine, SamplingParams
from tests.conftest import small_model


def collect(engine, prompt, **params):
    events = []
    req = engine.submit(prompt, SamplingParams(**params), events.append)
    return req, events


def run_alone(model, prompt, **params):
    engine = Engine(model, max_batch=1)
    req, events = collect(engine, prompt, **params)
    engine.run_until_idle()
    return req.generated


@pytest.mark.parametrize("attn_type,policy", [("mla", "per_loop"), ("gqa", "per_loop"), ("mla", "ring")])
def test_greedy_is_the_same_alone_or_batched(attn_type, policy):
    model = small_model(vocab_size=64, std=0.1, attn_type=attn_type, kv_cache_policy=policy, kv_cache_ring=2)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 11, [3, 1, 4, 1, 5, 9, 2], [6, 6, 6]]
    depths = [3, 1, 2, 3, 2]
    budgets = [6, 9, 3, 7, 5]
    alone = [run_alone(model, p, max_tokens=m, temperature=0, n_loops=d)
             for p, d, m in zip(prompts, depths, budgets, strict=True)]
    assert len({tuple(a[:3]) for a in alone}) == len(prompts)  # a mixed-up row would show
    engine = Engine(model, max_batch=3, **({} if policy == "ring" else {"prefill_chunk": 4}))
    reqs = [collect(engine, p, max_tokens=m, temperature=0, n_loops=d)[0]
            for p, d, m in zip(prompts, depths, budgets, strict=True)]
    while not engine.idle:
        engine.step()
        depths_now = [engine._depth(r) for r in engine.rows]
        assert depths_now == sorted(depths_now, reverse=True)  # deepest first: loops run on a prefix
    for req, expected, m in zip(reqs, alone, budgets, strict=True):
        assert req.generated == expected
        assert len(req.generated) == m


def test_a_seeded_sampled_request_is_the_same_alone_or_batched():
    """Sampling reads each request's own logits row (greedy rows alone would not show a mix-up:
    every other equivalence test here is greedy)."""
    model = small_model(vocab_size=64, std=0.1)
    prompts, seeds = [[1, 2, 3, 4, 5], [7, 8], [9] * 6], [11, 12, 13]
    alone = [run_alone(model, p, max_tokens=6, temperature=1.0, seed=s) for p, s in zip(prompts, seeds, strict=True)]
    assert len({tuple(a) for a in alone}) == len(prompts)
    engine = Engine(model, max_batch=3)
    reqs = [collect(engine, p, max_tokens=6, temperature=1.0, seed=s)[0] for p, s in zip(prompts, seeds, strict=True)]
    engine.run_until_idle()
    assert [r.generated for r in reqs] == alone


def test_a_ring_cache_prefills_each_prompt_whole_as_generate_does():
    """A ring cache shorter than the depth is exact only for a prompt prefilled in one call: the
    engine's default 64-token chunks made a longer prompt read its earlier chunks through the
    ring, and the engine's greedy tokens differed from `generate`'s. A chunk size asked for
    explicitly is refused by name."""
    model = small_model(4, vocab_size=64, std=0.1, max_seq_len=128, kv_cache_policy="ring", kv_cache_ring=2)
    prompt = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(4)).tolist()
    want = model.generate([prompt], 8, temperature=0)[0, 80:].tolist()
    engine = Engine(model)
    assert engine.prefill_chunk == model.cfg.max_seq_len
    req, _ = collect(engine, prompt, max_tokens=8, temperature=0)
    engine.run_until_idle()
    assert req.generated == want
    assert Engine(model, max_loops=2).prefill_chunk == 64  # a ring as deep as the loops is exact
    with pytest.raises(ValueError, match="prefill_chunk=16: a ring cache .kv_cache_ring=2. shorter than max_loops=3"):
        Engine(model, prefill_chunk=16)


@pytest.mark.parametrize("halting", ["act", "kl"])
def test_greedy_is_the_same_alone_or_batched_when_tokens_halt(halting):
    # each token leaves the loop when its rule says so, in steps that mix prompts and decoding
    # rows (a packed call once ran the KL exit on a mislaid (tokens, vocab) buffer and crashed)
    model = small_model(vocab_size=64, std=0.1, halting=halting, act_threshold=0.5, kl_threshold=1e-2, min_loops=1)
    with torch.no_grad():
        model.recurrent.act.halt.weight.normal_(0, 1.0)  # ragged ACT exits
    prompts, depths, budgets = [[1, 2, 3, 4, 5], [7, 8], [9] * 11, [6, 6, 6]], [3, 1, 2, 3], [6, 9, 3, 5]
    alone = [run_alone(model, p, max_tokens=m, temperature=0, n_loops=d)
             for p, d, m in zip(prompts, depths, budgets, strict=True)]
    assert len({tuple(a[:3]) for a in alone}) == len(prompts)
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    reqs = [collect(engine, p, max_tokens=m, temperature=0, n_loops=d)[0]
            for p, d, m in zip(prompts, depths, budgets, strict=True)]
    engine.run_until_idle()
    assert [req.generated for req in reqs] == alone
    # some positions stopped before their request's depth
    asked = sum((len(p) + m - 1) * d for p, d, m in zip(prompts, depths, budgets, strict=True))
    assert sum(r.loops for r in reqs) < asked


def test_prompts_prefill_in_the_decode_call_packed_and_deepest_first():
    model = small_model(vocab_size=64, std=0.1)
    prompts, depths = [[1, 2], [3] * 9, [4, 5, 6]], [2, 3, 1]
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(args[0].shape)),
                                with_kwargs=True)
    reqs = [collect(engine, p, max_tokens=4, temperature=0, n_loops=d)[0]
            for p, d in zip(prompts, depths, strict=True)]
    engine.step()  # every prompt's first chunk, left-padded into one call
    assert calls == [(3, 4)] and [len(r.generated) for r in reqs] == [1, 0, 1]
    engine.step()  # the long prompt's second chunk beside a token for each of the others
    assert calls[1:] == [(3, 4)] and [len(r.generated) for r in reqs] == [2, 0, 2]
    # the rows are deepest first, whether decoding or not; padding takes no cache columns:
    # each row holds just its own tokens
    assert [engine.rows.index(r) for r in reqs] == [1, 0, 2]
    assert engine.cache.lengths.tolist() == [8, 3, 4]
    # loops count only real tokens: prompt positions at their depth, plus what was decoded
    assert [r.loops for r in reqs] == [2 * 3, 3 * 8, 1 * 4]
    engine.step()  # the prompt's last token: every row takes one token, a plain ragged call
    assert calls[2:] == [(3, 1)] and [len(r.generated) for r in reqs] == [3, 1, 3]
    engine.run_until_idle()
    for req, p, d in zip(reqs, prompts, depths, strict=True):
        assert req.generated == run_alone(model, p, max_tokens=4, temperature=0, n_loops=d)


def test_a_short_prompt_beside_a_long_one_can_fill_the_context():
    # left padding used to take cache columns, so the short request ran out of them mid-way
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=2, max_len=40)
    done = []
    engine.submit([1, 2], SamplingParams(max_tokens=38, temperature=0), done.append)
    engine.submit([3] * 30, SamplingParams(max_tokens=4, temperature=0), done.append)
    engine.run_until_idle()
    assert [e.usage["completion_tokens"] for e in done if e.kind == "done"] == [4, 38]


def admission_order(admission, depths, budgets):
    """One row: the order in which the waiting requests (all there at t = 0) are taken."""
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=1, admission=admission, admission_window=2)
    reqs = [collect(engine, [1, 2], max_tokens=m, temperature=0, n_loops=d)[0]
            for m, d in zip(budgets, depths, strict=True)]
    picked, next_waiting = [], engine._next_waiting
    engine._next_waiting = lambda: picked.append(next_waiting()) or picked[-1]
    engine.run_until_idle()
    return [reqs.index(r) for r in picked], reqs


def test_depth_admission_takes_the_deepest_but_never_waits_without_bound():
    order, reqs = admission_order("depth", depths=[1, 3, 3, 3], budgets=[1, 1, 1, 1])
    # the deep ones go first; the shallow one, passed over admission_window = 2 times, is next
    assert order == [1, 2, 0, 3]
    assert reqs[0].passed_over == 2
    # among equal depths the longest goes first
    assert admission_order("depth", depths=[2, 2], budgets=[1, 5])[0] == [1, 0]
    assert admission_order("fifo", depths=[1, 3, 3, 3], budgets=[1, 1, 1, 1])[0] == [0, 1, 2, 3]


def test_engine_matches_generate():
    model = small_model(vocab_size=64, std=0.1)
    prompt = [5, 4, 3, 2, 1, 0, 9]
    ref = model.generate(torch.tensor([prompt]), 8, temperature=0, n_loops=2)[0, len(prompt):].tolist()
    assert len(set(ref)) > 1  # not one token repeated
    assert run_alone(model, prompt, max_tokens=8, temperature=0, n_loops=2) == ref


def test_slots_are_freed_after_many_requests():
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=4, max_queue=200, prefill_chunk=3)
    done = []
    for i in range(100):
        engine.submit([1 + i % 50, 2, 3], SamplingParams(max_tokens=1 + i % 4, temperature=0,
                                                          n_loops=1 + i % 3), done.append)
    engine.run_until_idle()
    finished = [e for e in done if e.kind == "done"]
    assert len(finished) == 100 and all(e.finish_reason == "length" for e in finished)
    assert engine.idle and engine.stats()["free_rows"] == 4


def test_cancel_frees_the_slot():
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=1)
    req, events = collect(engine, [1, 2, 3], max_tokens=20, temperature=0)
    engine.step()
    engine.cancel(req)
    engine.step()
    assert engine.idle and events[-1].finish_reason == "cancelled"


def test_a_request_cancelled_while_waiting_ends_without_running():
    """Cancelled in the queue, a request ends at the next step and never takes a row: no token,
    no loops (it used to wait for a row, prefill, and could stream a token before it ended)."""
    engine = Engine(small_model(vocab_size=64), max_batch=1)
    collect(engine, [1, 2], max_tokens=3, temperature=0)  # holds the only row
    waiting, events = collect(engine, [3, 4], max_tokens=3, temperature=0)
    engine.step()
    engine.cancel(waiting)
    engine.step()
    assert [(e.kind, e.finish_reason) for e in events] == [("done", "cancelled")]
    assert events[0].usage == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2,
                               "loops_executed": 0}
    assert engine.stats()["waiting"] == 0
    engine.run_until_idle()
    assert len(events) == 1 and waiting.generated == []


def test_stats_and_a_cancelling_shutdown_count_the_waiting_requests():
    """stats() while a request waits for the only row, and shutdown(cancel=True) ends the
    waiting requests at the next step as well as the running ones."""
    engine = Engine(small_model(vocab_size=64), max_batch=1)
    _, running = collect(engine, [1, 2], max_tokens=5, temperature=0)
    _, waiting = collect(engine, [3], max_tokens=5, temperature=0)
    engine.step()
    assert engine.stats() == {"running": 1, "waiting": 1, "free_rows": 0}
    engine.shutdown(cancel=True)
    engine.step()
    assert running[-1].finish_reason == waiting[-1].finish_reason == "cancelled" and engine.idle


def test_stop_strings_and_eos_with_a_tokenizer():
    tok = ByteTokenizer()
    model = small_model(vocab_size=tok.vocab_size)
    engine = Engine(model, tokenizer=tok, max_batch=2)
    free = run_alone(model, list(b"hello"), max_tokens=12, temperature=0)
    text = tok.decode(free)
    assert len(text) >= 5
    stop = text[3:5]
    req, events = collect(engine, list(b"hello"), max_tokens=12, temperature=0, stop=(stop,))
    engine.run_until_idle()
    streamed = "".join(e.text for e in events if e.kind == "token")
    assert streamed == text[:text.index(stop)] and events[-1].finish_reason == "stop"
    engine.eos = free[2]
    req, events = collect(engine, list(b"hello"), max_tokens=12, temperature=0)
    engine.run_until_idle()
    assert req.generated == free[:free.index(free[2])] and events[-1].finish_reason == "stop"


def test_stop_strings_hold_back_only_what_could_begin_one():
    """With stop strings, streaming holds back len(stop) - 1 characters, the most that could
    still begin one; every other character goes out as soon as its token is decoded."""
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter(b"abcdef")
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=6, temperature=0, stop=("zz", "yyy"))
    pieces = []
    for _ in range(4):  # the prompt's step gives "a", then "b", "c", "d"
        engine.step()
        pieces.append("".join(e.text for e in events if e.kind == "token"))
    assert pieces == ["", "", "a", "ab"]  # "yyy" may begin in the last two characters
    engine.run_until_idle()
    assert "".join(e.text for e in events if e.kind == "token") == req.text == "abcdef"


@pytest.mark.parametrize("stop", [("",), ("", "zz")])  # alone it lost the text; beside another, it
def test_an_empty_stop_string_stops_and_holds_nothing(stop):  # must not shrink that one's hold
    """An empty stop string matches nowhere and holds no text back: the stream and the final
    text are the completion's whole text, as with no stop strings (it used to lose all but the
    first character)."""
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter(b"abcdef")
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=6, temperature=0, stop=stop)
    engine.run_until_idle()
    assert "".join(e.text for e in events if e.kind == "token") == req.text == "abcdef"
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("junk", [b"", b"\x80\x80", b"\xe4"])  # stray bytes before it
def test_streamed_text_keeps_characters_split_over_tokens_whole(junk):
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    want = "東京, naïve ✓ done"
    script = iter(junk + want.encode())  # one byte per token: the multi-byte characters span tokens
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=len(junk + want.encode()), temperature=0)
    engine.run_until_idle()
    pieces = [e.text for e in events if e.kind == "token"]
    assert "".join(pieces) == req.text == tok.decode(req.generated) == "\ufffd" * len(junk) + want
    assert not any("\ufffd" in p for p in pieces[len(junk):])


def test_loops_are_counted_per_request():
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=2)
    shallow, ev1 = collect(engine, [1, 2], max_tokens=4, temperature=0, n_loops=1)
    deep, ev2 = collect(engine, [1, 2], max_tokens=4, temperature=0, n_loops=3)
    engine.run_until_idle()
    # prompt positions plus every decoded token but the first (sampled from the prefill)
    assert ev1[-1].usage["loops_executed"] == 1 * (2 + 3)
    assert ev2[-1].usage["loops_executed"] == 3 * (2 + 3)


def test_a_padded_vocabulary_never_serves_its_padding_ids():
    """A model padded past its tokenizer's vocabulary: the engine decodes only the tokenizer's
    ids, even when a padding id has the largest logit (it could not be decoded as text)."""
    tok = ByteTokenizer()
    model = small_model(vocab_size=320, std=0.1)
    with torch.no_grad():  # the head is tied to the embedding: make the padding ids win
        model.embed.weight[tok.vocab_size:] *= 50
    engine = Engine(model, tokenizer=tok, max_batch=2)
    reqs = [collect(engine, list(p), max_tokens=3, temperature=t) for p, t in ((b"hi", 0), (b"yo", 1.5))]
    engine.run_until_idle()
    for req, events in reqs:
        assert events[-1].finish_reason in ("length", "stop") and req.generated
        assert max(req.generated) < tok.vocab_size


def test_usage_counts_the_prompt_and_the_completion():
    """The done event's usage: total_tokens is prompt plus completion (OpenAI's meaning)."""
    engine = Engine(small_model(vocab_size=64), max_batch=1)
    _, events = collect(engine, [1, 2, 3], max_tokens=4, temperature=0, n_loops=2)
    engine.run_until_idle()
    assert events[-1].usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                "loops_executed": 2 * (3 + 3)}


@pytest.mark.parametrize("prompt,params,needle", [
    ([1], dict(n_loops=99), "n_loops"),
    ([1], dict(n_loops=True), "n_loops"),
    ([1], dict(max_tokens=True), "max_tokens"),
    ([1] * 60, dict(max_tokens=10), "context"),
    ([1, 64], {}, r"prompt\[1\] must be an integer token id in \[0, 64\), got 64"),
    ([1.0, 2.0], {}, r"prompt\[0\] must be an integer token id .* got 1.0"),
    ("hello", {}, "prompt must be a list of token ids, got str"),
    (torch.tensor([[1, 2]]), {}, r"prompt\[0\] must be an integer token id .* got \[1, 2\]"),
    ([1], dict(temperature=-1), "temperature"),
    ([1], dict(temperature=float("nan")), "temperature"),
    ([1], dict(seed=2**64), "seed"),
    ([1], dict(seed=-1), "seed"),
    ([1], dict(stop=(5,)), "stop must be a tuple of strings"),
    ([1], dict(stop="zz"), "stop must be a tuple of strings"),
])
def test_bad_requests_are_refused(prompt, params, needle):
    engine = Engine(small_model(vocab_size=64), max_batch=1)
    with pytest.raises(ValueError, match=needle):
        engine.submit(prompt, SamplingParams(**params), print)
    assert engine.idle


@pytest.mark.parametrize("params,on_event,needle", [
    ({"max_tokens": 2}, print, "params must be a SamplingParams, got dict"),
    (SamplingParams(max_tokens=2), None, "on_event must be callable, got None"),
])
def test_a_bad_params_or_callback_is_refused_at_submit(params, on_event, needle):
    """Found only in a step, it failed every request in the step (and a None callback, called
    again for the error event, ended the engine thread)."""
    engine = Engine(small_model(vocab_size=64), max_batch=2)
    with pytest.raises(TypeError, match=needle):
        engine.submit([1, 2], params, on_event)
    assert engine.idle


def test_a_callback_that_raises_ends_its_step_and_the_engine_serves_on():
    engine = Engine(small_model(vocab_size=64), max_batch=2)
    thread = threading.Thread(target=engine.serve_forever)
    thread.start()
    try:
        def broken(event):
            raise RuntimeError("a client's bug")

        engine.submit([1, 2], SamplingParams(max_tokens=3, temperature=0), broken)
        done = threading.Event()
        _, served = collect(engine, [3, 4], max_tokens=3, temperature=0)
        engine.submit([5], SamplingParams(max_tokens=1), lambda ev: ev.kind == "done" and done.set())
        assert done.wait(30) and thread.is_alive()
    finally:
        engine.shutdown()
        thread.join(30)
    assert served[-1].kind == "done"


@pytest.mark.parametrize("name", ["max_batch", "max_queue", "prefill_chunk", "max_len", "max_loops",
                                  "admission_window"])
def test_bad_engine_settings_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        Engine(small_model(vocab_size=64), **{name: 0})


def test_a_callback_may_submit_when_a_waiting_request_is_cancelled():
    engine = Engine(small_model(vocab_size=64), max_batch=1)
    follow_ups = []
    engine.submit([1], SamplingParams(max_tokens=2), print)  # holds the only row
    waiting = engine.submit([2], SamplingParams(max_tokens=2), lambda ev: follow_ups.append(
        engine.submit([3], SamplingParams(max_tokens=1), print)) if ev.kind == "done" else None)
    engine.cancel(waiting)
    done = threading.Thread(target=engine.run_until_idle, daemon=True)  # it used to deadlock on the lock
    done.start()
    done.join(30)
    assert not done.is_alive() and len(follow_ups) == 1 and engine.idle


@pytest.mark.parametrize("stop", [("hello", "lo"), ("lo", "hello")])
def test_the_earliest_stop_string_cuts_whatever_the_order(stop):
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter(tok.encode("say hello there"))
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=15, temperature=0, stop=stop)
    engine.run_until_idle()
    assert req.text == "say " and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("stop", ["\ufffd", "a\ufffd"])
def test_a_stop_string_never_matches_a_character_still_being_decoded(stop):
    # "é" is two byte tokens: after the first, the held tail decodes as U+FFFD for a moment
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter(tok.encode("aé b\xff"))
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=6, temperature=0, stop=(stop,))
    engine.run_until_idle()
    # the stray last byte is a real U+FFFD, final on the last token: there the stop matches
    assert req.text == "aé b" if stop == "\ufffd" else req.text == "aé b\ufffd"
    assert events[-1].finish_reason == ("stop" if stop == "\ufffd" else "length")


class _MergedTokenizer(ByteTokenizer):
    """Bytes plus token 258 = b"x\xc3": an ASCII character joined to the lead byte of a
    two-byte one, as byte-level BPE merges (GPT-2's "\u0120\u00e2")."""

    def __init__(self):
        super().__init__()
        self.vocab_size = 259

    def _decode(self, ids):
        return super()._decode([b for i in ids for b in (b"x\xc3" if i == 258 else [i])])

    def _token_bytes(self, token):
        return b"x\xc3" if token == 258 else super()._token_bytes(token)


def test_a_stop_string_in_the_held_tail_still_cuts_at_eos():
    # token 258's text, "x" and an unfinished character, is held; EOS next makes it final (the
    # unfinished byte as U+FFFD), and a stop string that only the final text holds must still cut
    # (a stop of "x" alone cut at token 258 already, and never reached the EOS branch)
    tok = _MergedTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter([ord("a"), 258, tok.eos_id])
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=8, temperature=0, stop=("x\ufffd",))
    engine.run_until_idle()
    assert req.text == "a" and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events if e.kind == "token") == "a"


def test_bytes_no_character_can_finish_do_not_hold_back_the_stream():
    tok = ByteTokenizer()
    engine = Engine(small_model(vocab_size=tok.vocab_size), tokenizer=tok, max_batch=1)
    script = iter([0xFF] * 8 + list(b"ok"))  # byte ids: 0xFF starts no UTF-8 character
    engine._sample = lambda req, logits, greedy: next(script)
    req, events = collect(engine, list(b"hi"), max_tokens=10, temperature=0)
    engine.run_until_idle()
    texts = [e.text for e in events if e.kind == "token"]
    assert "".join(texts[:6]).startswith("\ufffd")  # sent within a few tokens, not at the end
    assert req.text == "\ufffd" * 8 + "ok"


def test_a_full_queue_pushes_back():
    from openmythos.serving import QueueFull

    engine = Engine(small_model(vocab_size=64), max_batch=2, max_queue=1)
    for _ in range(3):  # two free rows and a place in the queue, before any step admits them
        engine.submit([1], SamplingParams(), print)
    with pytest.raises(QueueFull, match="queue of 1 waiting requests is full"):
        engine.submit([1], SamplingParams(), print)
    engine.step()  # two requests took the rows: one place in the queue, taken
    with pytest.raises(QueueFull):
        engine.submit([1], SamplingParams(), print)


def test_the_default_depth_stays_within_the_engines_max_loops():
    model = small_model(vocab_size=64, max_loop_iters=3)
    engine = Engine(model, max_batch=1, max_loops=2)
    req, events = collect(engine, [1, 2], max_tokens=2, temperature=0)
    engine.run_until_idle()
    assert events[-1].finish_reason == "length" and req.loops == 2 * (2 + 1)


def test_a_failed_step_ends_its_requests_and_the_engine_serves_on(monkeypatch):
    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=2)
    forward = type(model).forward
    failures = iter([RuntimeError("injected")])

    def flaky(self, *args, **kwargs):
        for error in failures:  # the first call only
            raise error
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky)
    thread = threading.Thread(target=engine.serve_forever)
    thread.start()
    try:
        first, second = threading.Event(), threading.Event()
        _, failed = collect(engine, [1, 2], max_tokens=3, temperature=0)
        engine.submit([1, 2], SamplingParams(max_tokens=3, temperature=0), lambda ev: ev.kind == "done" and first.set())
        assert first.wait(30)
        _, served = collect(engine, [3, 4], max_tokens=3, temperature=0)
        engine.submit([5], SamplingParams(max_tokens=1), lambda ev: ev.kind == "done" and second.set())
        assert second.wait(30)
    finally:
        engine.shutdown()
        thread.join(30)
    assert failed[-1].finish_reason == "error"
    assert served[-1].finish_reason == "length" and len([e for e in served if e.kind == "token"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_is_served_as_each_request_alone(seed):
    # random prompts, depths, budgets, batch sizes and chunk sizes under every halting rule and
    # cache policy: each request's greedy tokens are those of its own run
    rng = random.Random(seed)
    for trial in range(6):
        policy = rng.choice(["per_loop", "ring"])
        model = small_model(seed=trial, vocab_size=64, halting=rng.choice(["none", "act", "kl"]),
                            attn_type=rng.choice(["mla", "gqa"]), kv_cache_policy=policy,
                            kv_cache_ring=2, act_threshold=0.5, kl_threshold=1e-3, min_loops=1)
        with torch.no_grad():
            model.recurrent.act.halt.weight.normal_(0, 1.0)
        n = rng.randint(2, 7)
        prompts = [[rng.randrange(64) for _ in range(rng.randint(1, 14))] for _ in range(n)]
        depths, budgets = [rng.randint(1, 3) for _ in range(n)], [rng.randint(1, 9) for _ in range(n)]
        chunk = rng.randint(1, 6)  # a ring shorter than the depth takes prompts whole
        engine = Engine(model, max_batch=rng.randint(1, 4), **({} if policy == "ring" else {"prefill_chunk": chunk}))
        reqs = [collect(engine, p, max_tokens=m, temperature=0, n_loops=d)[0]
                for p, d, m in zip(prompts, depths, budgets, strict=True)]
        engine.run_until_idle()
        for req, p, d, m in zip(reqs, prompts, depths, budgets, strict=True):
            assert req.generated == run_alone(model, p, max_tokens=m, temperature=0, n_loops=d), (trial, p, d)


def test_numpy_token_ids_are_token_ids():
    import numpy as np

    engine = Engine(small_model(vocab_size=64), max_batch=1)
    req, events = collect(engine, list(np.array([1, 2, 3])), max_tokens=2, temperature=0)
    engine.run_until_idle()
    assert req.prompt == [1, 2, 3] and all(type(t) is int for t in req.prompt)
    assert events[-1].finish_reason == "length"


def test_a_request_whose_sampling_fails_ends_alone(monkeypatch):
    engine = Engine(small_model(vocab_size=64), max_batch=2)
    sample = engine._sample

    def fussy(req, logits, greedy):
        if req.params.seed == 7:
            raise RuntimeError("injected")
        return sample(req, logits, greedy)

    monkeypatch.setattr(engine, "_sample", fussy)
    _, failed = collect(engine, [1, 2], max_tokens=3, temperature=1.0, seed=7)
    _, served = collect(engine, [3, 4], max_tokens=3, temperature=0)
    engine.run_until_idle()
    assert failed[-1].finish_reason == "error" and served[-1].finish_reason == "length"
    assert served[-1].usage["completion_tokens"] == 3 and engine.idle


def test_numpy_and_tensor_requests_serve_beside_plain_ones():
    """A numpy n_loops (which validates as an integer) must reach the model as one, and a tensor
    prompt as a list: neither may fail the step the other requests share."""
    import numpy as np

    model = small_model(vocab_size=64)
    engine = Engine(model, max_batch=2)
    plain, ev1 = collect(engine, [1, 2, 3], max_tokens=3, temperature=0, n_loops=2)
    numpy, ev2 = collect(engine, torch.tensor([1, 2, 3]), max_tokens=3, temperature=0, n_loops=np.int64(2))
    engine.run_until_idle()
    assert ev1[-1].finish_reason == ev2[-1].finish_reason == "length"
    expected = model.generate(torch.tensor([[1, 2, 3]]), 3, n_loops=2, temperature=0)[0, 3:].tolist()
    assert plain.generated == numpy.generated == expected


def test_a_request_without_n_loops_runs_at_the_engines_default_depth():
    model = small_model(vocab_size=64)  # max_loop_iters 3
    for default, want in ((None, 3), (1, 1), (9, 5)):  # capped at max_loops
        engine = Engine(model, max_batch=2, max_loops=5, default_loops=default)
        req, _ = collect(engine, [1, 2, 3], max_tokens=2, temperature=0)
        engine.run_until_idle()
        assert req.loops == want * (3 + 2 - 1)  # every position that ran: the prompt and 1 output
    with pytest.raises(ValueError, match="default_loops must be a positive integer, got 0"):
        Engine(model, default_loops=0)
