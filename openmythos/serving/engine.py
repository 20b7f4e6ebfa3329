"""A continuous depth-wise batching engine.

Across requests (continuous batching): requests join and leave between steps. Each running
request owns one row of a preallocated, packed KV cache (a row holds just its own tokens), so
every model call runs on a contiguous view of the cache, never a copy. A step is one call: the
next token of every decoding request and the next chunk of every prompt being prefilled, so a
long prompt never stalls the requests that are decoding and a new one rides along with them
(a ring cache shorter than the depth takes each prompt whole: only then is it exact).
Rows are kept deepest first: the rows still looping at each depth are then a prefix of the
batch, and the looped block runs on it densely, with no gathers (see
RecurrentBlock._deepest_first).

Inside a step (depth-wise batching): every request decodes at its own depth (a per-row n_loops),
and with ACT or the KL exit each token leaves the loop when its rule says so. The looped block
runs on a compacted batch of the tokens still active at each depth (see model/recurrence.py),
so a shallow request costs shallow compute even when it shares a step with a deep one.

Admission (which waiting request takes a free row): a decode step costs about its deepest row's
loops, whatever the others ask, so rows of like depth should share steps. With
`admission="depth"` (the default) the engine takes, among the first `admission_window` waiting
requests, the deepest, the one asking the most tokens among equals: the deep requests run
together first and the shallow ones follow, riding along as the last deep rows finish (the
longest first, so the short ones fill the gaps at the end). A request passed over
`admission_window` times is taken next, so none waits without bound. `admission="fifo"` takes
them in arrival order.

The engine is synchronous and single-threaded; `serve_forever` runs it on a background thread
for the HTTP server, which talks to it through `submit` and per-request callbacks.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from openmythos.config import is_int
from openmythos.data.tokenizer import TextStream, Tokenizer, check_fits
from openmythos.generation import check_sampling, is_greedy, sample
from openmythos.model import OpenMythos

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 64  # prompt tokens per step, unless a ring cache needs whole prompts


class QueueFull(RuntimeError):
    """The engine's waiting queue is at capacity: back off and retry (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    n_loops: int | None = None  # None: the engine's default_loops (the model's max_loop_iters)
    seed: int | None = None

    def validate(self, max_loops: int) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.n_loops is not None and not (is_int(self.n_loops) and 1 <= self.n_loops <= max_loops):
            raise ValueError(f"n_loops must be an integer in [1, {max_loops}], got {self.n_loops!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")


@dataclass
class Event:
    kind: str  # "token" or "done"
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on "done"
    usage: dict | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    loops: int = 0  # loops executed, summed over every position this request ran
    emitted: int = 0  # characters of the completion already sent
    text: str = ""
    stream: TextStream | None = None  # decodes the completion as it grows (with a tokenizer)
    cancelled: bool = False
    generator: torch.Generator | None = None
    passed_over: int = 0  # times a later arrival was admitted first

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


def _earliest(text: str, stops: tuple[str, ...]) -> int | None:
    """Where `text` first holds one of the stop strings, whichever is listed first."""
    return min((text.index(s) for s in stops if s and s in text), default=None)


class Engine:
    def __init__(self, model: OpenMythos, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int | None = None, max_len: int | None = None,
                 max_loops: int | None = None, admission: str = "depth",
                 admission_window: int | None = None, default_loops: int | None = None):
        if admission not in ("depth", "fifo"):
            raise ValueError(f"admission must be 'depth' or 'fifo', got {admission!r}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                            ("max_len", max_len), ("max_loops", max_loops), ("admission_window", admission_window),
                            ("default_loops", default_loops)):
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if tokenizer is not None:
            check_fits(tokenizer, model.cfg.vocab_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.cfg.max_seq_len if max_len is None else max_len
        self.max_loops = model.cfg.max_loop_iters if max_loops is None else max_loops
        # a ring cache shorter than the depth is exact only for a prompt prefilled in one call: a
        # later chunk would read the earlier ones through the ring, not at its own loops
        whole = model.cfg.kv_cache_loop_slots(self.max_loops) < self.max_loops
        if whole and prefill_chunk is not None and prefill_chunk < self.max_len:
            raise ValueError(f"prefill_chunk={prefill_chunk}: a ring cache (kv_cache_ring="
                             f"{model.cfg.kv_cache_ring}) shorter than max_loops={self.max_loops} "
                             "prefills each prompt in one call; leave prefill_chunk unset")
        self.prefill_chunk = self.max_len if whole else prefill_chunk or DEFAULT_PREFILL_CHUNK
        # a request without n_loops: default_loops, else the model's max_loop_iters; at most max_loops
        self.default_loops = min(default_loops or model.cfg.max_loop_iters, self.max_loops)
        self.admission = admission
        # a few batches' worth of waiting requests to choose depths from; passed over as many
        # times, a request is taken next
        self.admission_window = 4 * max_batch if admission_window is None else admission_window
        self.cache = model.new_cache(max_batch, self.max_len, self.max_loops, packed=True)
        self.rows: list[Request] = []  # rows[i] owns cache row i; deepest first
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.eos = tokenizer.eos_id if tokenizer is not None else None
        self.vocab = tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size

    # the caller's side
    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Request:
        # checked here: a bad one found in a step would fail every request in it
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not callable(on_event):
            raise TypeError(f"on_event must be callable, got {on_event!r}")
        params.validate(self.max_loops)
        if hasattr(prompt, "tolist"):  # a tensor or numpy array of ids
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context of {self.max_len} tokens")
        vocab = self.model.cfg.vocab_size
        bad = next((i for i, t in enumerate(prompt) if not (is_int(t) and 0 <= t < vocab)), None)
        if bad is not None:
            raise ValueError(f"prompt[{bad}] must be an integer token id in [0, {vocab}), got {prompt[bad]!r}")
        stream = TextStream(self.tokenizer) if self.tokenizer is not None else None
        req = Request(list(map(int, prompt)), params, on_event, stream=stream)
        if params.seed is not None:
            req.generator = torch.Generator(self.model.embed.weight.device).manual_seed(params.seed)
        with self.lock:
            if self.stopping:
                raise QueueFull("the engine is shutting down")
            # a free row takes a waiting request at the next step: the queue starts past them
            if len(self.waiting) >= self.max_queue + self.max_batch - len(self.rows):
                raise QueueFull(f"every row is taken and the queue of {self.max_queue} waiting requests is full")
            self.waiting.append(req)
        self.wakeup.set()
        return req

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step (a client that went away)."""
        req.cancelled = True
        self.wakeup.set()

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting),
                "free_rows": self.max_batch - len(self.rows)}

    # the engine's side
    @torch.no_grad()
    def step(self) -> None:
        """Admit, then one call: a token for every decoding request, a chunk of every prompt
        being prefilled."""
        self._retire()
        self._admit()
        self._advance()

    def _retire(self) -> None:
        for req in [r for r in self.rows if r.cancelled]:
            self._finish(req, "cancelled")
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for req in gone:
                self.waiting.remove(req)
        for req in gone:  # outside the lock: a callback may submit
            req.on_event(Event("done", finish_reason="cancelled", usage=self._usage(req)))

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.rows) < self.max_batch:
                req = self._next_waiting()
                self.waiting.remove(req)
                self.cache.reset_rows(len(self.rows), 1)
                self.rows.append(req)
        self._arrange()

    def _next_waiting(self) -> Request:
        window = list(itertools.islice(self.waiting, self.admission_window))
        if self.admission == "fifo" or window[0].passed_over >= self.admission_window:
            return window[0]
        pick = max(range(len(window)), key=lambda i: (self._depth(window[i]), window[i].params.max_tokens))
        for req in window[:pick]:
            req.passed_over += 1
        return window[pick]

    def _advance(self) -> None:
        """One model call for every running request: a decoding one feeds its last token, any
        other the next chunk of its prompt (at most prefill_chunk tokens), left-padded to the
        widest. The cache is packed, so padding takes no columns and the layers run on the real
        tokens alone; the rows are deepest first, so each loop runs on a prefix of them (see
        RecurrentBlock._deepest_first), and a prompt shares the step's loops, and their weight
        reads, with the decoding rows instead of paying for loops of its own."""
        rows = list(self.rows)
        if not rows:
            return
        feeds = [[r.generated[-1]] if r.decoding else r.prompt[r.prefilled:r.prefilled + self.prefill_chunk]
                 for r in rows]
        out = self._call(feeds, rows)
        for req, feed, loops in zip(rows, feeds, out.loops.sum(1).tolist(), strict=True):
            req.loops += loops
            if not req.decoding:
                req.prefilled += len(feed)
        logits = out.logits[:, -1, :self.vocab]  # a padded vocabulary's extra ids never decode
        greedy = logits.argmax(-1).tolist()  # every greedy row's token in one op
        for i, req in enumerate(rows):
            if not req.decoding:
                continue
            try:  # its next token: after the last of its prompt or of its output
                token = self._sample(req, logits[i:i + 1], greedy[i])
            except RuntimeError:  # this request's sampling failed, not the step: it ends alone
                log.exception("sampling failed for request %d", req.id)
                self._finish(req, "error")
                continue
            self._emit(req, token)

    def _call(self, feeds: list[list[int]], rows: list[Request]):
        """The model on the running rows: each row's new tokens, left-padded."""
        width = max(map(len, feeds))
        device = self.model.embed.weight.device
        ids = torch.tensor([[0] * (width - len(f)) + f for f in feeds], device=device)
        mask = None
        if min(map(len, feeds)) < width:
            mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in feeds], device=device)
        return self.model(ids, n_loops=self._depths(rows), cache=self.cache.narrow(0, len(rows)),
                          attention_mask=mask, logits_to_keep=1)

    def _depth(self, req: Request) -> int:
        return req.params.n_loops or self.default_loops

    def _depths(self, reqs: list[Request]) -> int | torch.Tensor:
        """One int when every row asks the same depth: the loop then runs without bookkeeping."""
        depths = [self._depth(r) for r in reqs]
        if len(set(depths)) == 1:
            return depths[0]
        return torch.tensor(depths, device=self.model.embed.weight.device)

    def _sample(self, req: Request, logits: torch.Tensor, greedy: int) -> int:
        """The row's next token from its logits (1, V); `greedy`, their argmax, at a greedy
        temperature (generation.is_greedy)."""
        p = req.params
        if is_greedy(p.temperature):
            return greedy
        return int(sample(logits, p.temperature, p.top_k, p.top_p, req.generator)[0])

    def _emit(self, req: Request, token: int) -> None:
        if token == self.eos:  # the held tail is final now: a stop string in it still cuts
            cut = _earliest(req.text, req.params.stop)
            req.text = req.text if cut is None else req.text[:cut]
            return self._finish(req, "stop")
        req.generated.append(token)
        full = len(req.prompt) + len(req.generated) >= self.max_len
        last = len(req.generated) >= req.params.max_tokens or full
        settled = text = ""
        if req.stream is not None:  # the text no later token can change, then a held tail
            req.stream.push(token)
            settled, text = req.stream.text, req.stream.text + req.stream.tail
        # stop strings match settled text: a held tail decodes as U+FFFD until it is whole
        # (on the last token the tail is final)
        cut = _earliest(text if last else settled, req.params.stop)
        if cut is not None:
            req.text = text[:cut]
            return self._finish(req, "stop")
        req.text = text
        # hold back an unfinished character, and settled text that could still begin a stop string
        hold = max((len(s) - 1 for s in req.params.stop if s), default=0)  # "" stops nothing
        visible = len(settled) - hold
        if visible > req.emitted:
            req.on_event(Event("token", text=text[req.emitted:visible], token=token))
            req.emitted = visible
        elif self.tokenizer is None:
            req.on_event(Event("token", token=token))
        if last:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        if req.emitted < len(req.text):
            req.on_event(Event("token", text=req.text[req.emitted:]))
            req.emitted = len(req.text)
        self._arrange(gone=req)
        req.on_event(Event("done", finish_reason=reason, usage=self._usage(req)))

    def _arrange(self, gone: Request | None = None) -> None:
        """Put the rows (less `gone`, whose row is freed) deepest first, moving the cache rows of
        those that change place."""
        order = sorted((r for r in self.rows if r is not gone), key=lambda r: -self._depth(r))
        src = [self.rows.index(r) for r in order]
        moved = [i for i, s in enumerate(src) if s != i]
        if moved:
            self.cache.move_rows([src[i] for i in moved], moved)
        self.rows = order

    def _usage(self, req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.generated),
                "total_tokens": len(req.prompt) + len(req.generated), "loops_executed": req.loops}

    # running
    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def serve_forever(self) -> None:
        """The engine thread: step while there is work, sleep until a submit wakes it."""
        while True:
            with self.lock:
                if self.stopping and self.idle:
                    return
            if self.idle:
                self.wakeup.wait(timeout=0.1)
                self.wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # a failed step ends the requests it ran, not the engine
                log.exception("engine step failed: ending its %d requests with an error", len(self.rows))
                for req in self.rows:
                    try:  # a callback that raised in the step may raise again
                        req.on_event(Event("done", finish_reason="error", usage=self._usage(req)))
                    except Exception:
                        log.exception("a request's on_event failed on its error event")
                self.rows = []

    def shutdown(self, cancel: bool = False) -> None:
        """Refuse new requests; finish (or cancel) the running ones, then stop serve_forever."""
        with self.lock:
            self.stopping = True
            if cancel:
                for req in [*self.rows, *self.waiting]:
                    req.cancelled = True
        self.wakeup.set()
