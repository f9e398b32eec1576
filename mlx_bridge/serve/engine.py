"""The server's worker: one thread owns the model and runs continuous (iteration-level) batching.

The loop follows vLLM's scheduler, one iteration at a time:

    admit    new requests: tokenize and check them (`prepare`), queue their rows (FIFO)
    mixed    one step for every decoding row with prompt chunks riding on it (`runner.launch(...,
             chunks)`, vLLM's chunked prefill; the chunks alone while no row decodes): up to `mix` =
             (lanes, tokens) chunks of the rows still prefilling, then of waiting rows placed in free
             KV slots (a long prompt may fill several lanes; a burst of newcomers rides in wide steps,
             as many chunks as fill one of the runner's lane counts well), one forward pass for both,
             so the weights are read once; the running rows get a token every step while a long
             prompt prefills
    prefill  when the runner has no mixed steps (`mix` None): calls (`runner.prefill`) for the
             rows still prefilling and the waiting rows that take free KV slots, up to 4 rows and
             `prefill_chunk` tokens a call, at most `prefill_calls` calls and one chunk of each row a
             round: a burst of newcomers is written in few rounds
    decode   one step for every running row (`runner.launch`), each with its own sampling settings
    collect  the previous round's tokens (first tokens of the rows whose prefill ended, then the
             step's): text, stop strings, EOS, max_tokens; ended rows free their slot

A request therefore starts at the next step after it arrives (after its prefill), not when the
running batch ends, and each row leaves the batch as soon as it ends. Prefill and step are launched
before the previous round's tokens are read, so the device never waits for the host (the first
token of a row reaches its client one round after its prefill, with the decode step it joined).
`timing` says where the worker's time goes (idle, launching prefills and steps, waiting for tokens,
text and events). A request whose client
went away (`Job.cancelled`) has its rows ended at the next round. A request the model refuses fails
alone; if a decode step itself fails the model can no longer run: every request fails, `broken` says
why, and `/health` answers 503.

Example:
    >>> engine = Engine(model, max_batch=8).start()  # doctest: +SKIP
    >>> job = engine.submit(lambda m: ([m.encode_prompt("hi")], Sampling(max_tokens=8, temperature=0)))  # doctest: +SKIP
    >>> job.future.result()[0].text  # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from ..deploy.generation import Completion, RowText
from ..deploy.runners.shapes import carried
from ..deploy.runners.slots import MIX, batch_runner
from ..deploy.runners.steps import Chunk, RowSampling
from ..errors import BridgeError
from .metrics import Metrics
from .protocol import APIError, Sampling

log = logging.getLogger("mlx_bridge.serve")

# prepare(model) -> (prompt token ids per row, sampling); runs on the worker thread
Prepare = Callable[[Any], "tuple[list[list[int]], Sampling]"]
_ids = itertools.count()


@dataclass
class Piece:
    """Text of a streamed row."""

    index: int
    text: str


@dataclass
class StreamEnd:
    """The last event of a streamed row."""

    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    prepare: Prepare
    emit: Callable[[Any], None] | None = None  # streamed: receives "start", Piece, StreamEnd, APIError
    future: Future = field(default_factory=Future)  # not streamed: list[Completion], or the exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)  # row index -> Completion
    n_rows: int = 0
    unplaced: int = 0  # rows still waiting for a slot
    first_token: bool = False
    over: bool = False  # answered, failed or cancelled


@dataclass
class Row:
    job: Job
    index: int
    prompt: list[int]
    sampling: RowSampling
    text: RowText
    slot: int | None = None
    filled: int = 0  # prompt tokens in the cache
    pos: int = 0  # positions the row uses on the device (its next decode step writes here)
    launched: int = 0  # decode steps launched for it
    max_tokens: int = 1

    @property
    def ended(self) -> bool:
        return self.text.reason is not None


class Engine:
    """Queue + worker thread in front of a `DeployedModel`, continuous batching through its
    `batch_runner` (a KV-slot pool on the native dense models).

    Args:
        model: a `DeployedModel`.
        max_batch: most rows decoding at once (KV slots).
        max_queue: requests allowed to wait; past it `submit` raises a 429 `APIError` (Retry-After).
        max_len: positions per KV slot (prompt + new tokens; default: the model's context, at most 4096).
        prefill_chunk: most prompt tokens of one prefill call (one chunk of a row between two decode steps).
        prefill_calls: most prefill calls between two decode steps (each row at most one chunk). Each
            step in the middle of a burst of newcomers delays the burst's last rows by a step, and the
            batch then ends on steps for those rows alone; each call delays the running rows' next token.
        batch_sizes: batch sizes the decode step is prepared for (default 1, 2, 4, ... `max_batch`).
        mix: (lanes, tokens) of the prompt chunks a mixed step carries beside the decoding rows, or
            None: prefill only by separate calls. Runners without mixed steps (`RowRunner`) ignore it.
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 256, max_len: int | None = None,
                 prefill_chunk: int = 512, batch_sizes: tuple[int, ...] | None = None, prefill_calls: int = 4,
                 mix: tuple[int, int] | None = MIX):
        self.model, self.max_batch, self.max_queue = model, max(1, max_batch), max_queue
        self.max_len = min(max_len or min(model.max_context, 4096), model.max_context)
        self.prefill_chunk, self.prefill_calls = max(1, prefill_chunk), max(1, prefill_calls)
        self.runner = batch_runner(model, rows=self.max_batch, max_len=self.max_len, batch_sizes=batch_sizes,
                                   chunk=self.prefill_chunk, mix=mix)
        self.mix = getattr(self.runner, "mix", None)  # None: no mixed steps
        self.max_batch = self.runner.rows
        self.metrics = Metrics()
        self.timing = {"idle": 0.0, "prefill": 0.0, "launch": 0.0, "wait": 0.0, "text": 0.0}  # worker seconds, by part
        self.broken: str | None = None  # why the model can no longer run
        self.prepared: str | None = None
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waiting: deque[Row] = deque()  # rows waiting for a slot, FIFO
        self._running: dict[int, Row] = {}  # slot -> row (prefilling or decoding)
        self._free = list(range(self.max_batch))  # a heap: the lowest free slot first keeps batches small
        self._thread = threading.Thread(target=self._loop, name="mlx-bridge-engine", daemon=True)

    def prepare(self) -> str:
        """Compile and capture every decode shape now (before serving); what was prepared."""
        t = time.perf_counter()
        what = self.runner.prepare()
        self.prepared = f"{what} in {time.perf_counter() - t:.1f} s"
        return self.prepared

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.broken is None and self._thread.is_alive()

    @property
    def stats(self) -> Metrics:
        return self.metrics

    def submit(self, prepare: Prepare, emit: Callable[[Any], None] | None = None) -> Job:
        """Queue a job; `emit` makes it a streamed one. Thread-safe.

        Raises:
            APIError: 429 (with `retry_after`) when `max_queue` requests wait; 503 when the model
                can no longer run.
        """
        if self.broken is not None or (self._thread.ident is not None and not self._thread.is_alive()):
            raise APIError(503, "the model can no longer run; the server must be restarted", code="model_unavailable")
        with self._lock:
            if self.metrics.waiting >= self.max_queue:
                self.metrics.requests["rejected"] += 1
                e = APIError(429, f"the server is busy ({self.max_queue} requests waiting); retry later",
                             code="overloaded", type="rate_limit_error")
                e.retry_after = 1
                raise e
            self.metrics.waiting += 1
        job = Job(prepare, emit)
        self._q.put(job)
        return job

    # -- the worker thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        pending: list = []  # launched prefill / step whose tokens are not read yet: [(Pending, rows)]
        clock, t = self.timing, time.perf_counter
        try:
            while not self._stop.is_set():
                idle = not (self._waiting or self._running or pending)
                t0 = t()
                self._admit(block=idle)
                if idle:
                    clock["idle"] += t() - t0
                self._drop_cancelled()
                t0 = t()
                rows, launched = self._decoding(), []
                if not self.mix:  # separate prefill calls; the rows they start join this round's step
                    launched = self._prefills()
                    rows = self._decoding()
                t1 = t()
                picked = self._mix_chunks() if self.mix else []
                if rows or picked:  # a mixed step may carry prompt chunks alone (no row decodes yet)
                    step = ([r.slot for r in rows], max((r.pos for r in rows), default=0) + 1,
                            all(r.sampling.greedy for r in rows))
                    try:
                        p = self.runner.launch(*step, chunks=[ch for _, ch in picked]) if picked else self.runner.launch(*step)
                    except BridgeError as e:  # the model refused the riding chunks' input: they fail alone,
                        if not picked:  # the rows decode next round
                            raise
                        for job in {r.job.id: r.job for r, _ in picked}.values():
                            self._fail(job, e)
                        p = None
                    if p is not None:
                        for r in rows:
                            r.pos += 1
                            r.launched += 1
                        launched.append((p, rows + self._chunks_written(picked)))
                        self.metrics.steps += 1
                clock["prefill"] += t1 - t0
                clock["launch"] += t() - t1
                for p in pending:  # a row's first token before its step's
                    self._collect(*p)
                pending = [p for p in launched if p is not None]
            self._fail_all(APIError(503, "the server is shutting down", code="shutting_down"))
        except BaseException as e:  # the model cannot run any more: fail everyone, say so on /health
            log.exception("the model worker failed")
            self.broken = f"{type(e).__name__}"  # from now on the runner is not touched
            self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        for job in {r.job.id: r.job for r in [*self._waiting, *self._running.values()]}.values():
            self._fail(job, e)
        self._drain_queue(e)

    def _admit(self, block: bool) -> None:
        """Take new jobs from the queue (waiting for one when there is nothing else to do)."""
        while True:
            try:
                job = self._q.get(timeout=0.5) if block else self._q.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            if job.cancelled.is_set():
                self._end_job(job, "cancelled")
                continue
            try:
                prompts, s = job.prepare(self.model)
                self._check(prompts, s)
            except Exception as e:
                self._fail(job, e)
                continue
            job.n_rows = job.unplaced = len(prompts)
            self._emit(job, "start")  # the request is valid: errors now travel inside its event stream
            for i, ids in enumerate(prompts):
                rs = RowSampling(s.temperature, s.top_p, s.top_k, s.seed, stream=i)
                text = RowText(self.model.decode, self.model.eos_token_ids, list(s.stop) or None, s.max_tokens,
                               pieces=job.emit is not None)
                self._waiting.append(Row(job, i, list(ids), rs, text, max_tokens=s.max_tokens))

    def _check(self, prompts: list[list[int]], s: Sampling) -> None:
        vocab = self.runner.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(400, "the prompt is empty (0 tokens)", param="prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            if len(p) + s.max_tokens > self.max_len:
                raise APIError(400, f"prompt ({len(p)} tokens) + max_tokens ({s.max_tokens}) is more than the "
                               f"{self.max_len} positions a request may use on this server", param="max_tokens",
                               code="context_length_exceeded")

    def _drop_cancelled(self) -> None:
        for r in [*self._waiting, *self._running.values()]:
            if r.job.cancelled.is_set() and not r.job.over:
                self._end_job(r.job, "cancelled")

    def _decoding(self) -> list[Row]:
        """The rows that take a decode step this round."""
        return [r for r in self._running.values() if r.filled == len(r.prompt) and not r.ended
                and r.launched < r.max_tokens - 1]

    def _mix_chunks(self) -> list[tuple[Row, Chunk]]:
        """Prompt chunks riding on this round's step: up to `mix` lanes of at most `mix[1]` tokens,
        from the rows still prefilling (oldest first), then from waiting rows placed in free slots; as
        many as `shapes.carried` says of those ready (a burst of newcomers rides in wide steps, one
        newcomer in a narrow one)."""
        most, n = self.mix
        prefilling = [r for r in self._running.values() if r.filled < len(r.prompt) and not r.job.over]
        ready = sum(-(-(len(r.prompt) - r.filled) // n) for r in prefilling)
        for r in itertools.islice(self._waiting, len(self._free)):
            if ready >= most:
                break
            ready += -(-len(r.prompt) // n)
        lanes = carried(ready, getattr(self.runner, "mix_lanes", None) or (most,))
        picked: list[tuple[Row, Chunk]] = []

        def feed(r: Row) -> None:
            at = r.filled
            while at < len(r.prompt) and len(picked) < lanes:
                end = min(len(r.prompt), at + n)
                picked.append((r, Chunk(r.slot, r.prompt[at:end], at, r.sampling if end == len(r.prompt) else None)))
                at = end

        for r in prefilling:
            if len(picked) < lanes:
                feed(r)
        while self._waiting and self._free and len(picked) < lanes:
            r = self._waiting.popleft()
            r.slot = heapq.heappop(self._free)
            self._running[r.slot] = r
            self._placed(r.job)
            feed(r)
        return picked

    def _chunks_written(self, picked: list[tuple[Row, Chunk]]) -> list[Row]:
        """Account for launched chunks; the rows whose prompt is now written (their first token comes)."""
        done = []
        for r, ch in picked:
            r.filled += len(ch.tokens)
            self.metrics.prompt_tokens += len(ch.tokens)
            if ch.sampling is not None:
                r.pos = len(r.prompt)
                done.append(r)
        return done

    def _prefills(self) -> list:
        """This round's prefill calls (at most `prefill_calls`, each row at most one chunk), as
        `_prefill` returns them."""
        out: list = []
        seen: set[int] = set()
        for _ in range(self.prefill_calls):
            n = len(seen)
            out.append(self._prefill(seen))
            if len(seen) == n:
                break
        return out

    def _prefill(self, seen: set[int]) -> tuple | None:
        """Launch one prefill call: the next chunk (at most `prefill_chunk` tokens) of the rows already
        prefilling, then of waiting rows placed in free slots, as many as `runner.fits` takes together;
        rows whose slot is in `seen` (a chunk this round already) wait, and the call's slots join it.
        Returns (Pending of the first tokens, rows whose prompt is now written) or None."""
        take = lambda r: min(len(r.prompt) - r.filled, self.prefill_chunk)  # noqa: E731
        picked: list[Row] = []
        for r in self._running.values():
            if (r.filled < len(r.prompt) and r.slot not in seen and not r.job.over
                    and self.runner.fits([*map(take, picked), take(r)])):
                picked.append(r)
        while self._waiting and self._free and self.runner.fits([*map(take, picked), take(self._waiting[0])]):
            r = self._waiting.popleft()
            r.slot = heapq.heappop(self._free)
            self._running[r.slot] = r
            self._placed(r.job)
            picked.append(r)
        if not picked:
            return None
        seen.update(r.slot for r in picked)
        chunks = [Chunk(r.slot, r.prompt[r.filled:r.filled + take(r)], r.filled,
                        r.sampling if r.filled + take(r) == len(r.prompt) else None) for r in picked]
        try:
            pending = self.runner.prefill(chunks)
        except BridgeError as e:  # the model refused these requests' input
            for job in {r.job.id: r.job for r in picked}.values():
                self._fail(job, e)
            return None
        done = self._chunks_written(list(zip(picked, chunks)))
        return (pending, done) if done else None

    def _placed(self, job: Job) -> None:
        job.unplaced -= 1
        if job.unplaced == 0:
            with self._lock:
                self.metrics.waiting -= 1
        self.metrics.running = len(self._running)
        self.metrics.max_running = max(self.metrics.max_running, self.metrics.running)

    def _collect(self, pending, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        got = pending.tokens()
        t1 = time.perf_counter()
        for r in rows:
            if not r.ended and not r.job.over:
                self._tokens(r, [got[r.slot]])
        self.timing["wait"] += t1 - t0
        self.timing["text"] += time.perf_counter() - t1

    def _tokens(self, r: Row, tokens: list[int]) -> None:
        """A row's new tokens: its text, and its end."""
        job = r.job
        if not job.first_token:
            job.first_token = True
            self.metrics.ttft.observe(time.monotonic() - job.arrived)
        n0 = len(r.text.ids)
        try:
            piece = r.text.add(tokens)
        except Exception as e:  # the tokenizer failed on this row: the request fails alone
            self._fail(job, e)
            return
        self.metrics.generated(len(r.text.ids) - n0)
        if piece and job.emit is not None:
            self._emit(job, Piece(r.index, piece))
        if r.ended:
            self._row_done(r)

    def _row_done(self, r: Row) -> None:
        job = r.job
        self._release(r)
        c: Completion = r.text.completion(len(r.prompt))
        job.results[r.index] = c
        if job.emit is not None:
            self._emit(job, StreamEnd(r.index, c.finish_reason, c.prompt_tokens, len(c.token_ids)))
        if len(job.results) == job.n_rows:
            job.over = True
            self.metrics.requests["finished"] += 1
            self.metrics.latency.observe(time.monotonic() - job.arrived)
            if job.emit is None and not job.future.done():
                job.future.set_result([job.results[i] for i in range(job.n_rows)])

    def _release(self, r: Row) -> None:
        if r.slot is not None and self._running.get(r.slot) is r:
            del self._running[r.slot]
            if self.broken is None:
                self.runner.free(r.slot)
            heapq.heappush(self._free, r.slot)
            self.metrics.running = len(self._running)
        r.slot = None

    def _end_job(self, job: Job, outcome: str, error: APIError | None = None) -> None:
        """Take every row of `job` out (waiting or running); count it once."""
        if job.over:
            return
        job.over = True
        for r in [r for r in self._running.values() if r.job is job]:
            self._release(r)
        self._waiting = deque(r for r in self._waiting if r.job is not job)
        if job.unplaced > 0 or job.n_rows == 0:
            job.unplaced = 0
            with self._lock:
                self.metrics.waiting -= 1
        self.metrics.requests[outcome] += 1
        if error is not None:
            if job.emit is not None:
                self._emit(job, error)
            elif not job.future.done():
                job.future.set_exception(error)
        elif job.emit is None and not job.future.done():
            job.future.cancel()

    def _fail(self, job: Job, e: BaseException) -> None:
        if isinstance(e, APIError):
            err = e
        elif isinstance(e, BridgeError):  # the model refused the input (e.g. a token id outside the vocabulary)
            err = APIError(400, str(e))
        else:  # a bug or a broken device: the details go to the log, not to the client
            log.error("request %d failed: %s: %s", job.id, type(e).__name__, e)
            err = APIError(500, "internal error while generating (see the server log)")
        self._end_job(job, "failed", err)

    def _emit(self, job: Job, event) -> None:
        """Hand an event to a streamed job's client; a client that cannot take it is cancelled."""
        if job.emit is None:
            return
        try:
            job.emit(event)
        except Exception:  # never let a client's callback kill the worker
            log.exception("request %d: its event could not be delivered; cancelling it", job.id)
            job.cancelled.set()

    def _drain_queue(self, e: BaseException) -> None:
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail(job, e)
