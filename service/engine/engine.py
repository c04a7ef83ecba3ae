"""LLMEngine: continuous batching for one model on a dedicated worker thread.

Requests wait in a bounded FIFO queue. Each step of the worker is one forward: a token for every
decoding request plus up to `prefill_tokens_per_step` prompt tokens of new requests, admitted into
free KV-cache slots in arrival order. A prompt longer than that budget is prefilled over several
steps (chunks) while the others keep decoding, so a long prompt never stalls the batch. Decoding
requests occupy slots 0..B-1, followed by the ones being prefilled (at most one of them part-way):
when one leaves, the last decoding one moves into its slot, so each step decodes a prefix of the
cache. The slot count comes from memory (`slots_for_memory`) unless it is set. The caches of
finished requests are kept (`PrefixCache`) in what the KV budget leaves free (as vLLM keeps them
in its free cache blocks), at most `prefix_cache_bytes`: a new prompt that starts as one of them
did (a shared system prompt, the next turn of a chat) has that part copied into its slot instead
of prefilled.

Threading: the worker thread schedules; the model work of each step runs on the device's compute
thread (`service.engine.compute`), shared by every engine on that device. Tokens reach the asyncio
side through `loop.call_soon_threadsafe` onto a per-request `asyncio.Queue`. Flags the event loop
sets (abort, stop) are plain attributes read by the worker at the next step.

The engine reports its queue (each request's wait for a slot, the running and waiting counts) to
an `Observer` (`service.backend`), which the server's Prometheus adapter implements; per-request
latency is measured by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel

from service.backend import (
    BackendError,
    GenerationError,
    InvalidRequest,
    Observer,
    Overloaded,
    RequestTimeout,
    SamplingParams,
    Unavailable,
    check_sampling,
)
from service.engine.compute import run_async, run_sync
from service.engine.llama import LlamaRunner, unsupported_reason
from service.engine.prefix import PrefixCache, PrefixEntry
from service.engine.runner import Chunk, HFRunner, Runner, free_memory, slots_for_memory, trim_heap
from service.engine.sampling import make_generator, sample_one
from service.engine.types import EngineConfig, TokenEvent

log = logging.getLogger(__name__)

_END = object()  # queued for an aborted request: its iterator ends without a finish reason


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    arrival: float  # time.monotonic()
    deadline: float
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache
    cached: tuple[PrefixEntry, int] | None = None  # a kept cache holding its first n prompt tokens
    aborted: bool = False  # set from the event loop; the worker frees the slot at its next step
    done: bool = False  # the worker sent the last event (or error)
    finished: bool = False  # and it was the last token (stop or length): the cache holds a whole answer

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def ready(self) -> bool:
        """Whether the whole prompt is in the cache (the request decodes)."""
        return self.prefilled == len(self.prompt)


def make_runner(
    model: PreTrainedModel,
    max_slots: int,
    max_seq: int,
    fast: bool = True,
    release: bool = False,
    compiled: bool = False,
) -> Runner:
    """The compact runner when the architecture allows it (and `fast`), else the generic one.

    `release`: the runner owns the model, which nothing else changes: it may free the weights it keeps
    in another layout and point the others at equal ones already held (`LlamaRunner`).
    `compiled`: the compact runner compiles its decode step for one request (the generic one ignores it).
    """
    reason = unsupported_reason(model) if fast else "fast path disabled"
    if reason is None:
        return LlamaRunner(model, max_slots, max_seq, release=release, compiled=compiled)
    log.info("generic runner for %s: %s", model.config.model_type, reason)
    return HFRunner(model, max_slots, max_seq)


def eos_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    """End-of-sequence tokens: the generation config's (else the model config's) and the tokenizer's."""
    generation = getattr(model, "generation_config", None)
    model_eos = getattr(generation, "eos_token_id", None)
    if model_eos is None:
        model_eos = getattr(model.config, "eos_token_id", None)
    ids: set[int] = set()
    for value in (model_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return frozenset(ids)


class LLMEngine:
    """One model served with continuous batching; see the module docstring."""

    def __init__(
        self, name: str, model: PreTrainedModel, tokenizer, config: EngineConfig, observer: Observer | None = None
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.eos_token_ids = eos_ids(model, tokenizer)
        self.device = model.device
        max_seq = config.max_prompt_tokens + config.max_tokens
        # What the cache may take: the slots' caches, and the kept prefixes in what those leave free
        self.kv_budget = free_memory(self.device) // 4 if config.kv_cache_bytes is None else config.kv_cache_bytes
        slots = config.max_batch_size or slots_for_memory(model, max_seq, self.kv_budget)
        release, compiled = config.release_model_weights, config.compile_decode
        self.runner = run_sync(
            self.device, lambda: make_runner(model, slots, max_seq, release=release, compiled=compiled)
        )
        run_sync(self.device, trim_heap)
        log.info("engine %s: %d batch slots of %d positions", name, self.runner.max_slots, self.runner.max_seq)
        self.prefixes = PrefixCache(self._prefix_budget())  # worker thread only
        self.observer = observer
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()  # guarded by _cond
        self._running: list[_Request] = []  # worker thread only; index = cache slot; ready ones first
        self._active: dict[str, _Request] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._dead: str | None = None
        self.step_seconds = 0.0  # duration of the last worker step, for Retry-After estimates

    # ----- event-loop side -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (started, not shut down, worker alive)."""
        return self._accepting and self._dead is None

    @property
    def cache_bytes(self) -> int | None:
        """What the KV cache and the kept prefixes hold now (both grow with load); None if the runner cannot tell."""
        held = self.runner.cache_bytes
        return None if held is None else held + self.prefixes.nbytes

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        """Warm the model up off the event loop, then start the worker thread."""
        if self._thread is not None:
            raise RuntimeError(f"engine {self.name!r} already started")
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await run_async(self.device, self._warm_up)
        log.info(
            "engine %s warmed up in %.1f s (%s)", self.name, time.perf_counter() - started, type(self.runner).__name__
        )
        self._thread = threading.Thread(target=self._worker, name=f"engine-{self.name}", daemon=True)
        self._accepting = True
        self._thread.start()

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that can fail, checked before it is queued (InvalidRequest)."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; this model accepts at most {self.config.max_prompt_tokens}",
                "prompt",
            )
        if len(prompt_ids) >= self.runner.max_seq:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.runner.max_seq}", "prompt"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
        check_sampling(params, self.config.max_tokens)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        """Yield the request's tokens as they are produced; the last event has a finish reason.

        Errors (InvalidRequest, Overloaded, Unavailable) are raised at the first iteration, before
        any token. Closing the iterator early (client gone) aborts the request.
        """
        if self._dead is not None or not self._accepting:
            raise Unavailable(self._dead or f"engine {self.name!r} is not accepting requests")
        self._validate(prompt_ids, params)
        if request_id in self._active:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        req = _Request(
            request_id=request_id,
            prompt=list(prompt_ids),
            params=params,
            queue=asyncio.Queue(),
            arrival=now,
            deadline=now + self.config.request_timeout_s,
            stop_ids=stop_ids,
            generator=make_generator(params),
        )
        # In flight = running + waiting: a burst of arrivals fills the free batch slots first, and
        # only requests beyond them and `max_queue` more are refused.
        if len(self._active) >= self.runner.max_slots + self.config.max_queue:
            raise Overloaded(
                f"{self.name}: {len(self._active)} requests in flight (batch {self.runner.max_slots}, "
                f"queue {self.config.max_queue})",
                self._retry_after(),
            )
        with self._cond:
            self._waiting.append(req)
            self._cond.notify()
        self._active[request_id] = req
        try:
            while True:
                item = req.queue.get_nowait() if not req.queue.empty() else await self._next(req)
                if item is _END:
                    return
                if isinstance(item, BackendError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._active.pop(request_id, None)
            if not req.done:
                self._abort(req)

    async def _next(self, req: _Request) -> object:
        """Wait for the request's next item until its deadline."""
        try:
            return await asyncio.wait_for(req.queue.get(), timeout=max(req.deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise RequestTimeout(f"request {req.request_id} ran past {self.config.request_timeout_s:g} s") from None

    def _retry_after(self) -> float:
        """Rough seconds until a queue place frees: one request's worth of decode steps."""
        steps = max(self.step_seconds, 0.01) * 64
        return round(min(max(steps, 1.0), 60.0), 1)

    def _abort(self, req: _Request) -> None:
        req.aborted = True
        with self._cond:
            self._cond.notify()

    async def abort(self, request_id: str) -> None:
        """Stop a request: its iterator ends now and its slot is freed at the next step."""
        req = self._active.get(request_id)
        if req is None or req.done:
            return
        self._abort(req)
        req.queue.put_nowait(_END)

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting; let in-flight requests finish for up to `timeout` s, then end them (Unavailable)."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._running or self._waiting) and loop.time() < deadline and self._thread is not None:
            await asyncio.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._dead = self._dead or f"engine {self.name!r} was shut down"

    # ----- worker thread ---------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Run prefills, decodes (batch 1 and 2) and a mixed step once, so first requests meet warm kernels."""
        ids = [t % self.vocab_size for t in range(1, 9)]
        none = torch.empty(0, dtype=torch.long)
        batch = min(2, self.runner.max_slots)
        self.runner.step(none, none, [Chunk(slot, ids) for slot in range(batch)])
        for size in sorted({1, batch}):
            for _ in range(2):
                self.runner.step(torch.ones(size, dtype=torch.long), torch.full((size,), len(ids)))
        if batch == 2:
            self.runner.step(torch.ones(1, dtype=torch.long), torch.full((1,), len(ids) + 2), [Chunk(1, ids)])

    def _worker(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                started = time.perf_counter()
                try:
                    run_sync(self.device, self._step)
                except Exception as err:  # a failure no single request caused: end the batch, not the engine
                    log.exception("engine %s: step failed", self.name)
                    self._fail_all(self._running, GenerationError(f"generation failed: {err}"))
                    self._running.clear()
                    self._update_gauges()
                self.step_seconds = time.perf_counter() - started
        except BaseException as err:
            self._dead = f"engine {self.name!r} worker died: {err}"
            log.exception("engine %s: worker died", self.name)
            raise
        finally:
            self._dead = self._dead or f"engine {self.name!r} was shut down"
            with self._cond:
                leftover = list(self._waiting)
                self._waiting.clear()
            self._fail_all(self._running + leftover, Unavailable(self._dead))
            self._running.clear()
            self._update_gauges()

    def _fail_all(self, requests: list[_Request], error: BackendError) -> None:
        events = []
        for req in requests:
            if not req.done:
                req.done = True
                events.append((req, error))
        self._deliver(events)

    def _deliver(self, events: list[tuple[_Request, object]]) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, list(events))  # a copy: the caller may reuse its list

    def _update_gauges(self) -> None:
        if self.observer is not None:
            self.observer.load(len(self._running), len(self._waiting))

    def _step(self) -> None:
        """Admit and prefill waiting requests, then decode one token for every running one.

        A failure one request causes (its prefill, its sampling, non-finite scores, its decode)
        ends that request only. Events produced before any failure are always delivered.
        """
        events: list[tuple[_Request, object]] = []
        try:
            with torch.inference_mode():  # the cache tensors are inference tensors: every update in this mode
                self._step_in(events)
        finally:
            self._deliver(events)
            self._update_gauges()

    def _step_in(self, events: list[tuple[_Request, object]]) -> None:
        now = time.monotonic()
        for req in self._running:
            if not req.aborted and now > req.deadline:
                req.done = True
                events.append((req, RequestTimeout(f"request {req.request_id} ran past its deadline")))
        self._compact()
        decoding = [req for req in self._running if req.ready]
        prefills = self._plan_prefills(now, events)
        if decoding or prefills:
            self._run(decoding, prefills, events)
            self.prefixes.fit(self._prefix_budget())  # the slots' cache may have grown into their share
        self._compact()

    def _plan_prefills(self, now: float, events: list[tuple[_Request, object]]) -> list[tuple[_Request, Chunk]]:
        """This step's prompt chunks: the request part-way through its prompt first, then new ones.

        Up to `prefill_tokens_per_step` tokens in all; only the last chunk can stop short of its
        prompt's end, so at most one request is ever part-way (and it is the last in `_running`).
        """
        budget = self.config.prefill_tokens_per_step
        planned: list[tuple[_Request, Chunk]] = []

        def plan(req: _Request) -> int:  # req is the last in `_running`: its slot is the last one
            ids = req.prompt[req.prefilled : req.prefilled + budget]
            planned.append((req, Chunk(len(self._running) - 1, ids, req.prefilled)))
            return len(ids)

        if self._running and not self._running[-1].ready:
            budget -= plan(self._running[-1])
        for req in self._admit(now, budget, events):
            self._running.append(req)
            if req.cached is not None:  # the start of its prompt is kept: copy it in, prefill the rest
                entry, req.prefilled = req.cached
                req.cached = None  # the entry may be dropped later; the request no longer needs it
                self.runner.restore(entry.saved, len(self._running) - 1, req.prefilled)
            if self.observer is not None:
                self.observer.queue_wait(now - req.arrival)
                self.observer.prompt_cached(req.prefilled)
            budget -= plan(req)
        return planned

    def _run(
        self, decoding: list[_Request], prefills: list[tuple[_Request, Chunk]], events: list[tuple[_Request, object]]
    ) -> None:
        """One forward for the decoding requests (slots 0..B-1) and the prompt chunks.

        If it fails, each part runs alone so that only the request that fails is ended (every part
        rewrites the same cache positions, so running one again is safe).
        """
        tokens = torch.tensor([r.output[-1] for r in decoding], dtype=torch.long)
        positions = torch.tensor([r.length - 1 for r in decoding], dtype=torch.long)
        try:
            logits = self.runner.step(tokens, positions, [chunk for _, chunk in prefills])
        except Exception as err:
            if len(decoding) + len(prefills) == 1:
                self._fail((decoding or [prefills[0][0]])[0], err, events)
                return
            log.warning("engine %s: batched step failed (%s); running each request alone", self.name, err)
        else:
            self._choose(decoding, logits[: len(decoding)], events)
            for (req, chunk), row in zip(prefills, logits[len(decoding) :], strict=True):
                self._prefilled(req, chunk, row, events)
            return
        none = torch.empty(0, dtype=torch.long)
        for req, chunk in prefills:
            try:
                row = self.runner.step(none, none, [chunk])[0]
            except Exception as err:
                self._fail(req, err, events)
                continue
            self._prefilled(req, chunk, row, events)
        for i, req in enumerate(decoding):
            try:
                logits = self.runner.step(tokens[i : i + 1], positions[i : i + 1], first=i)
            except Exception as err:
                self._fail(req, err, events)
                continue
            self._choose([req], logits, events)

    def _prefilled(
        self, req: _Request, chunk: Chunk, logits: torch.Tensor, events: list[tuple[_Request, object]]
    ) -> None:
        """A chunk of the request's prompt is in the cache; after the last one, its first token."""
        req.prefilled = chunk.end
        if req.ready:
            self._choose([req], logits.unsqueeze(0), events)

    def _choose(self, batch: list[_Request], logits: torch.Tensor, events: list[tuple[_Request, object]]) -> None:
        """Sample each request's next token from its row of logits (B, vocab) and emit it."""
        scores = logits.float()  # exact; bf16 reductions over the vocabulary take twice as long on CPU
        # every score is finite exactly when each row's max and min are (a NaN makes both NaN)
        finite = (torch.isfinite(scores.amax(dim=-1)) & torch.isfinite(scores.amin(dim=-1))).tolist()
        greedy = torch.argmax(scores, dim=-1).tolist()
        # each token's log-probability under the model itself (no temperature): the answer's own NLL
        log_probs = torch.log_softmax(scores, dim=-1)
        for i, req in enumerate(batch):
            try:
                if not finite[i]:
                    raise GenerationError("the model produced non-finite scores")
                token = greedy[i] if req.generator is None else sample_one(logits[i], req.params, req.generator)
            except Exception as err:
                self._fail(req, err, events)
                continue
            self._emit(req, TokenEvent(token, None, float(log_probs[i, token]), token == greedy[i]), events)

    def _fail(self, req: _Request, err: Exception, events: list[tuple[_Request, object]]) -> None:
        """End one request with an error; the rest of the batch is untouched."""
        log.error("engine %s: request %s failed: %s", self.name, req.request_id, err, exc_info=err)
        if not req.done:
            req.done = True
            error = err if isinstance(err, GenerationError) else GenerationError(f"generation failed: {err}")
            events.append((req, error))

    def _admit(self, now: float, budget: int, events: list[tuple[_Request, object]]) -> list[_Request]:
        """Pop waiting requests into free slots while prompt budget lasts; drop aborted and expired ones."""
        admitted: list[_Request] = []
        with self._cond:
            while self._waiting and budget > 0 and len(self._running) + len(admitted) < self.runner.max_slots:
                req = self._waiting.popleft()
                if req.aborted:
                    req.done = True
                elif now > req.deadline:
                    req.done = True
                    events.append((req, RequestTimeout(f"request {req.request_id} timed out in the queue")))
                else:
                    admitted.append(req)
                    req.cached = self.prefixes.match(req.prompt, req.params.cache_salt)
                    budget -= len(req.prompt) - (req.cached[1] if req.cached else 0)
        return admitted

    def _emit(self, req: _Request, event: TokenEvent, events: list[tuple[_Request, object]]) -> None:
        if req.aborted or req.done:
            return
        req.output.append(event.token_id)
        reason = None
        if event.token_id in req.stop_ids:
            reason = "stop"
        elif len(req.output) >= req.params.max_tokens or req.length >= self.runner.max_seq:
            reason = "length"
        if reason is not None:
            req.done = req.finished = True
        events.append((req, replace(event, finish_reason=reason)))

    def _compact(self) -> None:
        """Remove finished and aborted requests: the last decoding request moves into each hole, and
        the one part-way through its prompt (if any) to the slot after the decoding ones."""
        partial = self._running.pop() if self._running and not self._running[-1].ready else None
        held = len(self._running)  # the partial request's slot
        i = 0
        while i < len(self._running):
            if not (self._running[i].done or self._running[i].aborted):
                i += 1
                continue
            if self._running[i].finished and not self._running[i].aborted:
                self._keep(self._running[i], i)
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                self.runner.move(last, i, moved.length - 1)
                self._running[i] = moved
            self._running.pop()
        if partial is not None and not (partial.done or partial.aborted):
            if held != len(self._running):
                self.runner.move(held, len(self._running), partial.prefilled)
            self._running.append(partial)

    def _prefix_budget(self) -> int:
        """Bytes the kept prefixes may take: what the slots' cache leaves of the KV budget, at most
        `prefix_cache_bytes` (none if the runner cannot tell its cache's size)."""
        held = self.runner.cache_bytes
        if held is None:
            return 0
        free = max(self.kv_budget - held, 0)
        cap = self.config.prefix_cache_bytes
        return free if cap is None else min(free, cap)

    def _keep(self, req: _Request, slot: int) -> None:
        """Keep a finished request's cache for prompts that start the same way (not its last token:
        that one was never run)."""
        tokens, salt = (req.prompt + req.output)[: req.length - 1], req.params.cache_salt
        if self.prefixes.budget and not self.prefixes.covers(tokens, salt):
            saved = self.runner.save(slot, len(tokens))
            if saved is not None:
                self.prefixes.add(tokens, *saved, salt)


def _put_all(events: list[tuple[_Request, object]]) -> None:
    for req, item in events:
        req.queue.put_nowait(item)
