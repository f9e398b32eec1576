"""OpenAI-compatible HTTP server for a deployed model: FastAPI + uvicorn.

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions` (`stream: true` answers with server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`). One worker thread owns the model (`server_engine.Engine`); handlers only
parse, queue and wait, so the event loop stays free and concurrent requests are batched.

Example:
    >>> from mlx_bridge import load
    >>> app = create_app(load("deploy/alpaca"), api_key="sk-local")  # doctest: +SKIP
    >>> serve(app, port=8000)  # doctest: +SKIP
    >>> # or, in tests: with ServerThread(app) as srv: OpenAI(base_url=srv.url + "/v1", api_key="sk-local")
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BridgeError
from . import protocol as proto
from .engine import Engine, StreamEnd
from .protocol import APIError

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TOKENS_LIMIT = 4096


def create_app(model, *, model_name: str | None = None, api_key: str | None = None,
               max_tokens_limit: int = MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES,
               max_batch: int = 8, max_queue: int = 256, defaults: dict | None = None) -> FastAPI:
    """Build the app around a loaded `DeployedModel`; the worker starts and stops with the app.

    Args:
        model: what `mlx_bridge.load` returned.
        model_name: the id clients pass as `model` (default: `model.name`).
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (401 otherwise).
        max_tokens_limit: largest `max_tokens` a request may ask for (400 above).
        max_body_bytes: largest request body (413 above).
        max_batch: most prompts in one batched forward pass.
        defaults: default `temperature`/`top_p`/`top_k` (e.g. from generation_config.json).

    Example:
        >>> app = create_app(model, model_name="alpaca", max_batch=16)  # doctest: +SKIP
    """
    name = model_name or model.name
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    defaults = dict(defaults or {})

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mlx-bridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

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
                "max_model_len": model.max_context}

    created = int(time.time())

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "worker stopped", "model": name, "stats": engine.stats.as_dict()}
        return JSONResponse(body, status_code=200 if ok else 503)

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
        req = proto.parse_completion(await read_json(request, max_body_bytes), limit=max_tokens_limit,
                                     defaults=defaults)
        return await answer(req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = proto.parse_chat(await read_json(request, max_body_bytes), limit=max_tokens_limit, defaults=defaults)
        return await answer(req)

    async def answer(req: proto.Request):
        if req.model is not None and req.model != name:
            raise APIError(404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found")
        prepare = _preparer(req, max_tokens_limit)
        rid = proto.new_id(req.kind)
        if req.stream:
            return await _stream(engine, req, prepare, rid, name)
        job = engine.submit(prepare)
        try:
            done = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        prompt_tokens = sum(c.prompt_tokens for c in done[::req.n])
        choices = [(c.text, c.finish_reason) for c in done]
        return proto.response(req.kind, rid, name, choices, prompt_tokens, sum(len(c.token_ids) for c in done))

    return app


def _preparer(req: proto.Request, limit: int):
    """The part of a request that needs the tokenizer: runs on the worker thread."""

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
            sampling = proto.fit_to_context(sampling, len(ids), model.max_context, limit,
                                            "messages" if req.kind == "chat" else "prompt")
        return [ids for ids in prompts for _ in range(req.n)], sampling

    return prepare


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object in the body; 413 past `limit` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    try:
        value = json.loads(body)
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
    """Default sampling from `generation_config.json` (temperature, top_p, top_k), as vLLM reads it.

    Example:
        >>> generation_defaults("deploy/alpaca")  # doctest: +SKIP
        {'temperature': 0.6, 'top_p': 0.9}
    """
    p = Path(path) / "generation_config.json"
    if not p.exists():
        return {}
    cfg = json.loads(p.read_text())
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening-ready socket on host:port (IPv4 or IPv6); `BridgeError` when the address is taken.

    Example:
        >>> s = bind("127.0.0.1", 0); s.getsockname()[0]
        '127.0.0.1'
    """
    try:
        family, kind, proto_, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto_)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise BridgeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None) -> None:
    """Run the app with uvicorn until interrupted (one process, one model worker).

    Example:
        >>> serve(create_app(model), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    sock = sock or bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


class ServerThread:
    """Run the app on a free loopback port in a background thread (tests, notebooks, the demo).

    Example:
        >>> with ServerThread(create_app(model)) as srv:  # doctest: +SKIP
        ...     httpx.get(srv.url + "/health").json()["status"]
        'ok'
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
