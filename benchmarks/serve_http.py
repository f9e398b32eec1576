"""The server's own cost per request: `mlx-bridge serve`'s app against a bare FastAPI app, one run.

Both apps run on the same uvicorn settings (`serve.http.ServerThread`: h11 with the header timeout,
the connection limit) in this process; a client process sends `--requests` requests from `--threads`
threads (one shared httpx client), after a warm-up of `--threads` x 2. The model is the tiny random
llama with its batch runner replaced by `serve.py`'s stand-in (no wait: every step answers at once),
so what is measured is the server's host side: HTTP, FastAPI, request parsing and checks, the worker
thread's scheduling and text, the answer. The anchor is the floor of the stack: a FastAPI route that
reads the JSON body and returns a fixed answer of the same shape.

Printed per app and load: requests/s (client wall time), and the server process's CPU time per
request (user + system, `getrusage`; the client is another process), and its ratio to the bare app's.

    python benchmarks/serve_http.py                     # non-streamed and streamed, 3,000 requests each
    python benchmarks/serve_http.py --requests 500      # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import sys
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request  # module level: FastAPI reads the route's annotations from here
from fastapi.responses import JSONResponse, StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve as bench  # noqa: E402  (benchmarks/serve.py: the stand-in runner, the tokenizer, the model builder)

PROMPT = list(range(5, 21))  # 16 token ids
STEP = 0.5e-3  # s a stand-in decode step takes: the worker waits with the GIL released, as on a device


def body(stream: bool, tokens: int) -> dict:
    return {"model": "m", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": stream}


def client(url: str, n: int, threads: int, stream: bool, tokens: int, out) -> None:
    """Send `n` requests from `threads` threads after a warm-up; put "warm", then the wall seconds, in `out`."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    c = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=threads))

    def ask(_):
        if not stream:
            c.post("/v1/completions", json=body(False, tokens)).raise_for_status()
            return
        with c.stream("POST", "/v1/completions", json=body(True, tokens)) as r:
            r.raise_for_status()
            for _ in r.iter_lines():
                pass

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(ask, range(threads * 2)))
        out.put("warm")
        t = time.perf_counter()
        list(pool.map(ask, range(n)))
        out.put(time.perf_counter() - t)


def bare_app(tokens: int):
    """The anchor: reads the JSON body, answers a completion of `tokens` words (streamed: one event each)."""
    from mlx_bridge.serve import protocol as proto

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    text = " w5" * tokens

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await request.json()
        if not req.get("stream"):
            return JSONResponse(proto.response("completion", "cmpl-0", "m", [(text, "length")], len(PROMPT), tokens))

        async def sse():
            for _ in range(tokens):
                yield f"data: {json.dumps(proto.chunk('completion', 'cmpl-0', 'm', 0, text=' w5'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def served_app(max_batch: int):
    """`create_app` over the tiny llama, its batch runner the stand-in that answers at once."""
    from mlx_bridge.deploy.runners.fast import FastRunner
    from mlx_bridge.serve.app import create_app

    cpu = torch.device("cpu")
    _, native, cfg = bench.raw.build("tiny", torch.float32, cpu)
    model = bench.deployed(native, cfg, cpu, torch.float32, FastRunner(native))
    app = create_app(model, model_name="m", max_batch=max_batch, max_len=256, max_queue=4096, mix=None,
                     prepare=False, max_request_tokens=1 << 30)
    app.state.engine.runner = bench.StandIn(max_batch, cfg.vocab_size, STEP, 0.0, len(PROMPT))
    return app


def got(out, p):
    """The client's next message, or None once the client process has ended without one."""
    while True:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            if not p.is_alive():
                return None


def measure(app, n: int, threads: int, stream: bool, tokens: int) -> tuple[float, float]:
    """(requests/s, server CPU ms per request) of `n` requests to `app`, the warm-up's CPU excluded."""
    from mlx_bridge.serve.http import ServerThread

    ctx = mp.get_context("spawn")
    with ServerThread(app) as srv:
        out = ctx.Queue()
        p = ctx.Process(target=client, args=(srv.url, n, threads, stream, tokens, out))
        p.start()
        if got(out, p) != "warm":  # the warm-up's CPU is not counted
            raise RuntimeError("the client process failed during its warm-up")
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        wall = got(out, p)
        if wall is None:
            raise RuntimeError("the client process failed")
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        p.join()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return n / wall, cpu / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    a = ap.parse_args(argv)
    rows = []
    for stream in (False, True):
        anchor = measure(bare_app(a.tokens), a.requests, a.threads, stream, a.tokens)
        ours = measure(served_app(a.threads), a.requests, a.threads, stream, a.tokens)
        rows.append(("streamed" if stream else "not streamed", anchor, ours))
    print(f"\n# {a.requests} requests of {len(PROMPT)} prompt tokens, {a.tokens} new tokens each, from {a.threads} "
          f"client threads in another process; torch {torch.__version__}; the runner answers at once\n")
    print("| load | bare FastAPI: req/s | CPU ms a request | mlx-bridge serve: req/s | CPU ms a request | CPU vs bare |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (r0, c0), (r1, c1) in rows:
        print(f"| {name} | {r0:.0f} | {c0:.2f} | {r1:.0f} | {c1:.2f} | {c1 / c0:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
