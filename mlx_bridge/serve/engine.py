"""The server's worker: one thread owns the model (and its tokenizer) and drains a queue of jobs.

Jobs that wait in the queue together, streamed or not, run as static batches through
`DeployedModel.run_rows` (ragged prompts, each row with its own max_tokens and stop strings, at most
`max_batch` rows a call): greedy rows all batch together, sampled rows with their temperature/top-p/
top-k, and a seeded request alone (so that it is reproducible). Streamed rows get their text pieces as
the batch decodes. The model is never touched from two threads, and a failing job fails alone: a
batch that raises is retried job by job (a stream that has sent text fails instead), and the worker
keeps serving.

Example:
    >>> engine = Engine(model, max_batch=8).start()  # doctest: +SKIP
    >>> job = engine.submit(lambda m: ([m.encode_prompt("hi")], Sampling(max_tokens=8, temperature=0)))
    >>> job.future.result()[0].text  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BridgeError
from ..deploy.deployed import Row
from .protocol import APIError, Sampling

# prepare(model) -> (prompt token ids per row, final sampling); runs on the worker thread
Prepare = Callable[[Any], "tuple[list[list[int]], Sampling]"]
_STOP = object()
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
    emit: Callable[[Any], None] | None = None  # streamed: receives "start", Piece, StreamEnd, errors
    future: Future = field(default_factory=Future)  # not streamed: list[Completion], or the exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    started: bool = False  # streamed: "start" sent


@dataclass
class Stats:
    jobs: int = 0
    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    streams: int = 0
    cancelled: int = 0  # streams stopped early because their client went away
    errors: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


class Engine:
    """Queue + worker thread in front of a `DeployedModel`.

    Args:
        model: a `DeployedModel` (`complete`, `stream_ids`, `encode_prompt`, `max_context`).
        max_batch: most prompt rows in one `complete` call.
        max_queue: jobs allowed to wait; past it `submit` raises a 503 `APIError`.
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 256):
        self.model, self.max_batch, self.max_queue = model, max(1, max_batch), max_queue
        self.stats = Stats()
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlx-bridge-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prepare: Prepare, emit: Callable[[Any], None] | None = None) -> Job:
        """Queue a job; `emit` makes it a streamed one. Thread-safe."""
        if self._q.qsize() >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry later",
                           code="overloaded")
        if not self._thread.is_alive() and self._thread.ident is not None:
            raise APIError(503, "the model worker has stopped", code="worker_stopped")
        job = Job(prepare, emit)
        self._q.put(job)
        return job

    # -- worker thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            jobs, stop = [first], False
            while len(jobs) < 4 * self.max_batch:
                try:
                    j = self._q.get_nowait()
                except queue.Empty:
                    break
                if j is _STOP:
                    stop = True
                    break
                jobs.append(j)
            try:
                self._step(jobs)
            except BaseException as e:  # never let the worker die with requests waiting
                for j in jobs:
                    self._fail(j, e)
            if stop:
                return

    def _step(self, jobs: list[Job]) -> None:
        groups: dict[Any, list[tuple[Job, list[list[int]], Sampling]]] = defaultdict(list)
        for job in jobs:
            if job.cancelled.is_set():
                continue
            self.stats.jobs += 1
            try:
                rows, sampling = job.prepare(self.model)
            except Exception as e:
                self._fail(job, e)
                continue
            groups[_batch_key(sampling, job)].append((job, rows, sampling))
        for members in groups.values():
            self._run_group(members)

    def _run_group(self, members: list[tuple[Job, list[list[int]], Sampling]]) -> None:
        """Rows of jobs with the same sampling, `max_batch` at a time. A job is answered (its future
        set, or its stream ended) as soon as its own rows end, not when the whole batch does."""
        s = members[0][2]
        flat = [(job, index, ids, sampling) for job, rows, sampling in members for index, ids in enumerate(rows)]
        results: dict[int, dict[int, Any]] = {job.id: {} for job, _, _ in members}
        sent: set[int] = set()  # streamed jobs that have sent text (they cannot be retried)

        n_rows = {job.id: len(rows) for job, rows, _ in members}

        def on_done(job: Job, index: int, prompt_tokens: int):
            def done(c) -> None:
                got = results[job.id]
                got[index] = c
                if job.emit is not None:
                    if not job.cancelled.is_set():
                        job.emit(StreamEnd(index, c.finish_reason, prompt_tokens, len(c.token_ids)))
                    if len(got) == n_rows[job.id]:
                        self.stats.streams += 1
                elif len(got) == n_rows[job.id] and not job.future.done():
                    job.future.set_result([got[i] for i in range(n_rows[job.id])])
            return done

        try:
            for i in range(0, len(flat), self.max_batch):
                chunk = flat[i:i + self.max_batch]
                rows = [Row(ids, sampling.max_tokens, list(sampling.stop) or None,
                            on_text=self._on_text(job, index, sent),
                            on_done=on_done(job, index, len(ids)))
                        for job, index, ids, sampling in chunk]
                for job, _, _, _ in chunk:
                    if job.emit is not None and not job.started:
                        job.started = True
                        job.emit("start")  # arguments are checked: errors now travel inside the event stream
                self.model.run_rows(rows, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
                self.stats.batches += 1
                self.stats.rows += len(chunk)
                self.stats.max_rows = max(self.stats.max_rows, len(chunk))
        except Exception as e:
            if len(members) == 1:
                self._fail(members[0][0], e)
                return
            for m in members:  # one bad request must not fail its batch-mates
                if len(results[m[0].id]) == n_rows[m[0].id]:
                    continue  # answered before the failure
                if m[0].id in sent:
                    self._fail(m[0], e)
                else:
                    self._run_group([m])

    def _on_text(self, job: Job, index: int, sent: set[int]):
        if job.emit is None:
            return None

        def on_text(piece: str) -> bool:
            if job.cancelled.is_set():
                self.stats.cancelled += 1
                return False  # the client went away: the row stops
            sent.add(job.id)
            job.emit(Piece(index, piece))
            return True

        return on_text

    def _fail(self, job: Job, e: BaseException) -> None:
        self.stats.errors += 1
        if isinstance(e, BridgeError):  # the model refused the input (e.g. a token id outside the vocabulary)
            e = APIError(400, str(e))
        elif not isinstance(e, APIError):
            e = APIError(500, f"{type(e).__name__}: {e}")
        if job.emit is not None:
            job.emit(e)
        elif not job.future.done():
            job.future.set_exception(e)


def _batch_key(s: Sampling, job: Job) -> tuple:
    """Greedy rows batch whatever their seed, max_tokens or stop strings; sampled rows with the same
    temperature/top-p/top-k; seeded sampling runs alone so that it is reproducible."""
    if s.temperature == 0:
        return ("greedy",)
    if s.seed is not None:
        return ("seeded", job.id)
    return ("sampled", s.temperature, s.top_p, s.top_k)
