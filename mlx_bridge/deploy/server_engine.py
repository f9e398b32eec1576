"""The server's worker: one thread owns the model (and its tokenizer) and drains a queue of jobs.

Non-streamed jobs that wait in the queue together are grouped by their sampling settings and run as
static batches through `DeployedModel.complete` (ragged prompts, at most `max_batch` rows a call), so a
loaded server answers many requests per forward pass; streamed jobs run one at a time. The model is
never touched from two threads, and a failing job fails alone: a batch that raises is retried job by
job, and the worker keeps serving.

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
from .server_protocol import APIError, Sampling

# prepare(model) -> (prompt token ids per row, final sampling); runs on the worker thread
Prepare = Callable[[Any], "tuple[list[list[int]], Sampling]"]
_STOP = object()
_ids = itertools.count()


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
    emit: Callable[[Any], None] | None = None  # streamed: receives "start", str pieces, StreamEnd, errors
    future: Future = field(default_factory=Future)  # not streamed: list[Completion], or the exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))


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
        groups: dict[Any, list[tuple[Job, list[list[int]]]]] = defaultdict(list)
        streams = []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            self.stats.jobs += 1
            try:
                rows, sampling = job.prepare(self.model)
            except Exception as e:
                self._fail(job, e)
                continue
            if job.emit is not None:
                streams.append((job, rows, sampling))
            else:
                groups[_batch_key(sampling, job)].append((job, rows))
        for key, members in groups.items():
            self._run_group(key[0], members)
        for job, rows, sampling in streams:
            self._run_stream(job, rows, sampling)

    def _run_group(self, sampling: Sampling, members: list[tuple[Job, list[list[int]]]]) -> None:
        flat = [(job, ids) for job, rows in members for ids in rows]
        out: dict[int, list] = defaultdict(list)
        try:
            for i in range(0, len(flat), self.max_batch):
                chunk = flat[i:i + self.max_batch]
                results = self.model.complete([ids for _, ids in chunk], **sampling.kwargs())
                self.stats.batches += 1
                self.stats.rows += len(chunk)
                self.stats.max_rows = max(self.stats.max_rows, len(chunk))
                for (job, _), r in zip(chunk, results):
                    out[job.id].append(r)
        except Exception as e:
            if len(members) == 1:
                self._fail(members[0][0], e)
            else:  # one bad request must not fail its batch-mates
                for m in members:
                    self._run_group(sampling, [m])
            return
        for job, _ in members:
            if not job.future.done():
                job.future.set_result(out[job.id])

    def _run_stream(self, job: Job, rows: list[list[int]], sampling: Sampling) -> None:
        self.stats.streams += 1
        try:
            for index, ids in enumerate(rows):
                s = sampling if sampling.seed is None or index == 0 else _reseed(sampling, sampling.seed + index)
                stream = self.model.stream_ids(ids, **s.kwargs())  # a TextStream: .last_completion at the end
                if index == 0:  # arguments checked: from here on errors travel inside the event stream
                    job.emit("start")
                try:
                    for piece in stream:
                        if job.cancelled.is_set():
                            self.stats.cancelled += 1
                            return
                        if piece:
                            job.emit(piece)
                finally:
                    stream.close()
                final = stream.last_completion
                job.emit(StreamEnd(index, final.finish_reason, len(ids), len(final.token_ids)))
        except Exception as e:
            self._fail(job, e)

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
    """Greedy rows batch whatever their seed; seeded sampling runs alone so that it is reproducible."""
    if s.temperature == 0:
        return (Sampling(s.max_tokens, 0.0, 1.0, 0, None, s.stop),)
    if s.seed is not None:
        return (s, job.id)
    return (s,)


def _reseed(s: Sampling, seed: int) -> Sampling:
    return Sampling(s.max_tokens, s.temperature, s.top_p, s.top_k, seed, s.stop)
