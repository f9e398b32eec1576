"""OpenAI-compatible HTTP server for a deployed model: FastAPI + uvicorn.

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions` (`stream: true` answers with server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`), `GET /metrics` (Prometheus text). One worker thread owns the model
(`engine.Engine`, continuous batching); handlers only parse, queue and wait, so the event loop stays
free. A client that goes away, streamed or not, has its rows stopped; the work a request may ask for
is bounded (`max_request_tokens`), the queue too (429 with Retry-After).

Example:
    >>> from mlx_bridge import load
    >>> app = create_app(load("deploy/alpaca"), api_key="sk-local")  # doctest: +SKIP
    >>> serve(app, port=8000)  # doctest: +SKIP
    >>> # or, in tests: with ServerThread(app) as srv: OpenAI(base_url=srv.url + "/v1", api_key="sk-local")
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BridgeError
from . import protocol as proto
from .engine import MIX, Engine, StreamEnd
from .http import Limits, ServerThread, bind, serve  # noqa: F401  (the app's runners, re-exported)
from .protocol import APIError

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TOKENS_LIMIT = 4096
MAX_REQUEST_TOKENS = 65536  # prompts x n x max_tokens of one request
BODY_TIMEOUT = 30.0  # s to receive a whole request body
log = logging.getLogger("mlx_bridge.serve")


def create_app(model, *, model_name: str | None = None, api_key: str | None = None,
               max_tokens_limit: int = MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES,
               max_batch: int = 8, max_queue: int = 256, defaults: dict | None = None,
               max_request_tokens: int = MAX_REQUEST_TOKENS, max_len: int | None = None, prefill_chunk: int = 512,
               batch_sizes: tuple[int, ...] | None = None, body_timeout: float = BODY_TIMEOUT,
               prepare: bool = True, mix: tuple[int, int] | None = MIX) -> FastAPI:
    """Build the app around a loaded `DeployedModel`; the worker starts and stops with the app.

    Args:
        model: what `mlx_bridge.load` returned.
        model_name: the id clients pass as `model` (default: `model.name`).
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (401 otherwise).
        max_tokens_limit: largest `max_tokens` a request may ask for (400 above).
        max_body_bytes: largest request body (413 above).
        max_batch: most rows decoding at once (KV slots of the continuous batch).
        max_queue: requests allowed to wait for a slot (429 with Retry-After past it).
        defaults: default `temperature`/`top_p`/`top_k` (`generation_defaults` of the export).
        max_request_tokens: most prompts x n x max_tokens one request may ask for (400 above).
        max_len: positions per KV slot (prompt + max_tokens; default: the context, at most 4096).
        prefill_chunk: most prompt tokens of one prefill call (a row gets one chunk between two decode steps).
        batch_sizes: decode batch sizes to prepare (default 1, 2, 4, ... max_batch).
        body_timeout: seconds a client has to send its request body (408 after).
        prepare: compile and capture every decode shape before the server says it is ready.
        mix: (lanes, tokens) of the prompt chunks riding on a decode step (mixed steps), or None.

    Example:
        >>> app = create_app(model, model_name="alpaca", max_batch=16)  # doctest: +SKIP
    """
    name = model_name or model.name
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, max_len=max_len, prefill_chunk=prefill_chunk,
                    batch_sizes=batch_sizes, mix=mix)
    defaults = dict(defaults or {})

    @asynccontextmanager
    async def lifespan(app):
        if prepare:  # uvicorn says it is ready only after this: nothing compiles or captures later
            log.info("decode steps prepared: %s", await asyncio.to_thread(engine.prepare))
        app.state.heap = freeze_heap()
        log.info("startup heap: %s", app.state.heap)
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)
        thaw_heap()

    app = FastAPI(title="mlx-bridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        retry = getattr(e, "retry_after", None)
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # the details go to the log, never to the client
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError(500, "internal server error (see the server log)").body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                           "'Authorization: Bearer <key>'.", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "mlx-bridge",
                "max_model_len": engine.max_len}

    created = int(time.time())

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "the model can no longer run", "model": name,
                "stats": engine.metrics.as_dict()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.alive), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        check_key(request)
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = proto.parse_completion(await read_json(request, max_body_bytes, body_timeout), limit=max_tokens_limit,
                                     defaults=defaults)
        return await answer(req, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = proto.parse_chat(await read_json(request, max_body_bytes, body_timeout), limit=max_tokens_limit,
                               defaults=defaults)
        return await answer(req, request)

    async def answer(req: proto.Request, request: Request):
        if req.model is not None and req.model != name:
            raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
        proto.check_work(req, max_request_tokens, max_tokens_limit)
        prepare = _preparer(req, max_tokens_limit, engine.max_len)
        rid = proto.new_id(req.kind)
        if req.stream:
            return await _stream(engine, req, prepare, rid, name)
        job = engine.submit(prepare)
        try:
            done = await _wait_or_disconnect(job, request)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if done is None:  # the client went away: its rows have been stopped; nobody reads an answer
            return PlainTextResponse("", status_code=499)
        prompt_tokens = sum(c.prompt_tokens for c in done[::req.n])
        choices = [(c.text, c.finish_reason) for c in done]
        body = proto.response(req.kind, rid, name, choices, prompt_tokens, sum(len(c.token_ids) for c in done))
        return JSONResponse(body)  # plain JSON types already: not FastAPI's jsonable_encoder walk of every field

    return app


_serving = 0  # apps serving in this process, the heap frozen while any does
_serving_lock = threading.Lock()


def freeze_heap() -> str:
    """Collect once, then move every object alive (the model, its compiled functions and captured
    graphs: a large heap) out of the collector's reach (`gc.freeze`), as vLLM does after its warm-up.
    A full collection walks the whole heap holding the GIL, so the worker thread, and the device
    behind it, would stall for as long; from now on the collector walks only what serving allocates.
    Returns what was frozen and what the full collection took. `thaw_heap` undoes it once the last
    app of the process that froze it stops.

    Example:
        >>> freeze_heap()  # doctest: +SKIP
        '1843310 objects frozen (a full collection took 412 ms)'
    """
    global _serving
    with _serving_lock:
        _serving += 1
        t = time.perf_counter()
        gc.collect()
        ms = (time.perf_counter() - t) * 1e3
        gc.freeze()
        return f"{gc.get_freeze_count()} objects frozen (a full collection took {ms:.0f} ms)"


def thaw_heap() -> None:
    """Give the frozen heap back to the collector when no app of this process serves any more."""
    global _serving
    with _serving_lock:
        _serving -= 1
        if _serving == 0:
            gc.unfreeze()


def _preparer(req: proto.Request, limit: int, context: int):
    """The part of a request that needs the tokenizer: runs on the worker thread. `context`: the
    positions a request may use (the KV slot length)."""

    def prepare(model):
        if req.kind == "chat":
            prompts = [model.encode_prompt(messages=req.messages)]
        else:
            vocab = model.config.get("vocab_size")
            prompts = []
            for p in req.prompts:
                if isinstance(p, str):
                    prompts.append(model.encode_prompt(prompt=p))
                elif vocab and any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                else:
                    prompts.append(list(p))
        sampling = req.sampling
        for ids in prompts:  # the longest prompt decides a missing max_tokens
            sampling = proto.fit_to_context(sampling, len(ids), context, limit,
                                            "messages" if req.kind == "chat" else "prompt")
        return [ids for ids in prompts for _ in range(req.n)], sampling

    return prepare


async def _wait_or_disconnect(job, request: Request, every: float = 0.25):
    """The job's result; None (and the job cancelled) when the client disconnects first."""
    fut = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({fut}, timeout=every)
        if done:
            return fut.result()
        if await request.is_disconnected():
            job.cancelled.set()
            fut.cancel()
            return None


async def read_json(request: Request, limit: int, timeout: float = BODY_TIMEOUT) -> dict:
    """The JSON object in the body; 413 past `limit` bytes, 408 when it takes more than `timeout`
    seconds to arrive, 400 when it is not a JSON object (or nests too deep to parse)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()

    async def receive():
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    try:
        value = json.loads(body)
    except RecursionError:
        raise APIError(400, "the JSON body nests too deeply", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return value


async def _stream(engine: Engine, req: proto.Request, prepare, rid: str, name: str):
    """Queue a streamed job; answer an error as JSON if it fails before its first token, else SSE."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            job.cancelled.set()

    job = engine.submit(prepare, emit)
    try:
        first = await events.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if isinstance(first, APIError):
        raise first

    async def sse():
        kind, n_rows = req.kind, req.n * max(1, len(req.prompts))
        prompt_tokens = completion_tokens = 0
        try:
            started = set()
            ended = 0
            while ended < n_rows:
                ev = await events.get()
                if isinstance(ev, APIError):
                    yield _data(ev.body())
                    break
                if isinstance(ev, StreamEnd):
                    ended += 1
                    if ev.index % req.n == 0:
                        prompt_tokens += ev.prompt_tokens
                    completion_tokens += ev.completion_tokens
                    if kind == "chat" and ev.index not in started:  # a row that ended with no text
                        started.add(ev.index)
                        yield _data(proto.chunk(kind, rid, name, ev.index, role=True))
                    yield _data(proto.chunk(kind, rid, name, ev.index, finish_reason=ev.finish_reason))
                    continue
                if kind == "chat" and ev.index not in started:  # rows of one request interleave
                    started.add(ev.index)
                    yield _data(proto.chunk(kind, rid, name, ev.index, role=True))
                yield _data(proto.chunk(kind, rid, name, ev.index, text=ev.text))
            else:
                if req.include_usage:
                    yield _data(proto.usage_chunk(kind, rid, name, prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client gone or stream over: the worker stops generating for it

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def generation_defaults(path: str | Path) -> dict:
    """Default sampling from the export's `generation_config.json`, as transformers' `generate`
    reads it: greedy (temperature 0) unless `do_sample` is true, then the file's `temperature`,
    `top_p` and `top_k` where it sets them (vLLM's `--generation-config auto`). No file: {} (OpenAI's
    defaults, as vLLM).

    Example:
        >>> generation_defaults("deploy/alpaca")  # doctest: +SKIP
        {'temperature': 0.0}
    """
    p = Path(path) / "generation_config.json"
    if not p.exists():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BridgeError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BridgeError(f"{p}: must be a JSON object")
    if not cfg.get("do_sample", False):
        return {"temperature": 0.0}
    out = {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}
    bad = [k for k, v in out.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise BridgeError(f"{p}: {bad[0]} must be a number, got {out[bad[0]]!r}")
    return out
