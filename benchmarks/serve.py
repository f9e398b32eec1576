"""Serving under load: `mlx-bridge serve`'s app against the raw decode path, same weights, one run.

Builds a random-weight Llama (default: Llama-2-7B shape, bf16 on CUDA; `--shape tiny` on CPU) as
`benchmarks/decode.py` does, measures the raw fast path (`FastRunner.steps`, decode.py's figures) at
batch 1 and `--max-batch`, then serves the same model (continuous batching, every decode shape
prepared before ready) and drives it from a separate client process:

- one request at a time (tokens/s of a whole request, prefill and first token included);
- `--max-batch` concurrent requests (tokens/s in all): a burst, all sent at once, from `--client-procs`
  client processes released together (one process's client, parsing thousands of streamed chunks
  with pydantic in 32 threads, was itself the limit: the requests reached the server over ~70 steps);
- `--max-batch` clients in a loop (each sends its next request when its last one ends, their starts
  spread over one request's time), for `--steady` seconds: the tokens/s the server generates in the
  window's middle half (its own counter), rows joining all the time, their prompts riding on the
  running rows' decode steps (mixed steps);
- `--arrivals` streamed requests arriving evenly over `--over` seconds: first-token and whole-request
  p50/p95, against one request alone;
- the last two again with the official `openai` client (streamed).

Prompts are `--prompt` random token ids, each request asks for `--tokens` new tokens (EOS off).
Prints a table; `--json` writes the numbers. The raw anchors: decode.py's figure (tokens/s of the
decode steps after the first token) and the raw path's whole generation (its one prefill call for
all rows included), since a served request's time includes its prefill; and the served step alone
(graph replays back to back, no request) against the raw step. For the burst it also prints the
bound no server beats on the card (`burst_bound`, from the steps measured in the same run) and, on
CUDA, its timeline: each launch's device time, the device's idle time, the steps after the last row's
first token, and when the last answer was handed over and received.

`--stand-in STEP_MS,PREFILL_MS` measures the server's own host-side cost on any machine: the model's
batch runner is replaced by one that only waits (GIL released, as a CUDA sync does) STEP_MS per
decode step and PREFILL_MS per `--prompt` tokens of prefill, and returns token 5; the "raw" column is
then what those waits alone allow.

    python benchmarks/serve.py                        # CUDA, Llama-2-7B shape, bf16
    python benchmarks/serve.py --shape tiny           # CPU development run
    python benchmarks/serve.py --stand-in 5,20        # host-side ceiling (any machine)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode as raw  # noqa: E402  (benchmarks/decode.py: the model builder and the raw decode loop)
from mlx_bridge.deploy.runners.slots import MIX  # noqa: E402


def tokenizer(vocab: int):
    """A real fast tokenizer over `vocab` word-level tokens (decode cost as a served model has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0", pad_token="w0")


def deployed(native, cfg, dev, dtype, runner):
    """The `DeployedModel` the server gets: the built model, `tokenizer`, id "m", no EOS."""
    from mlx_bridge.deploy.deployed import DeployedModel

    return DeployedModel(native, tokenizer(cfg.vocab_size), cfg.to_dict(), dev, dtype, "m",
                         cfg.max_position_embeddings, set(), runner, "native")


class StandIn:
    """A batch runner that only waits: each decode step `step` s and each prefill call `prefill` s per
    `per` tokens of its longest chunk (rows prefilled together cost one), one after another as on a
    GPU stream; the tokens are all 5."""

    def __init__(self, rows: int, vocab: int, step: float, prefill: float, per: int):
        self.rows, self.vocab_size, self.stats = rows, vocab, {"captures": 0, "steps": 0, "prefills": 0}
        self.step, self.prefill_s, self.per, self.busy = step, prefill, per, 0.0

    def _queue(self, seconds: float) -> float:
        self.busy = max(self.busy, time.perf_counter()) + seconds
        return self.busy

    def prepare(self) -> str:
        return f"stand-in: {self.step * 1e3:g} ms a step, {self.prefill_s * 1e3:g} ms a {self.per}-token prefill"

    def fits(self, lengths):
        return len(lengths) <= 4 and sum(lengths) <= max(lengths[0], self.per * 4)

    def prefill(self, chunks):
        self.stats["prefills"] += 1
        end = self._queue(self.prefill_s * max(len(c.tokens) for c in chunks) / self.per)
        return self._done({c.slot: 5 for c in chunks if c.sampling is not None}, end)

    @staticmethod
    def _done(got, end):
        class Done:
            def tokens(_):
                time.sleep(max(0.0, end - time.perf_counter()))
                return got

        return Done()

    def launch(self, slots, need, greedy):
        end, self.stats["steps"] = self._queue(self.step), self.stats["steps"] + 1
        return self._done({s: 5 for s in slots}, end)

    def free(self, slot):
        pass


def compiled() -> int:
    """Graphs torch.compile has made in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def device_ms(launch, n: int) -> float:
    """Milliseconds of one `launch()` (a step or prefill call that returns a `Pending`): one to warm
    up, then n back to back, the last one waited for."""
    launch().tokens()
    t = time.perf_counter()
    for _ in range(n):
        p = launch()
    p.tokens()
    return (time.perf_counter() - t) / n * 1e3


def step_ms(runner, B: int, need: int, n: int = 50) -> float:
    """Milliseconds of one served decode step at batch B, attending over the length bucket of `need`
    positions."""
    return device_ms(lambda: runner.launch(list(range(B)), need, greedy=True), n)


def first_chunks(runner, lanes: int, length: int) -> list:
    """The first chunk of a prompt (`length` tokens, not its last: no row starts) in each of the last
    `lanes` slots (no request runs yet: nothing reads them)."""
    from mlx_bridge.deploy.runners.steps import Chunk

    return [Chunk(runner.rows - 1 - i, [5] * length, 0) for i in range(lanes)]


def mixed_ms(runner, B: int, need: int, lanes: int, n: int = 20) -> float:
    """Milliseconds of one mixed step at batch B with `lanes` full lanes (`first_chunks`); B = 0: no
    decode row (how the server writes prompts while no row decodes)."""
    chunks = first_chunks(runner, lanes, runner.mix[1])
    return device_ms(lambda: runner.launch(list(range(B)), need, greedy=True, chunks=chunks), n)


def after_idle_ms(runner, need: int, idle: float = 2.0) -> tuple[float, float]:
    """Device milliseconds of one 1-lane mixed step with no decode row launched after `idle` seconds
    with nothing to do, and of the same step launched right after it: what a burst's first step pays
    for the device having been idle (CUDA events around each launch)."""
    chunks = first_chunks(runner, 1, runner.mix[1])
    out = []
    for pause in (idle, 0.0):
        time.sleep(pause)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        p = runner.launch([], need, greedy=True, chunks=chunks)
        ev[1].record()
        p.tokens()
        torch.cuda.synchronize()
        out.append(ev[0].elapsed_time(ev[1]))
    return out[0], out[1]


def prefill_ms(runner, rows: int, length: int, n: int = 20) -> float:
    """Milliseconds of one prefill call of `rows` chunks of `length` tokens (`first_chunks`)."""
    chunks = first_chunks(runner, rows, length)
    return device_ms(lambda: runner.prefill(chunks), n)


def burst_bound(rows: int, prompt: int, tokens: int, per_step: int, step_ms_: float, decode_ms: float) -> float:
    """Tokens/s of a burst of `rows` requests (`prompt` tokens in, `tokens` out each) if it cost nothing
    but its device work done at the best rates measured: every prompt token written by full steps of
    `per_step` prompt tokens (`step_ms_` each) from the first send, then the last rows' `tokens` - 1
    decode steps (`decode_ms` each, the raw batch step); the first token of a row comes with its prompt.

    Example (run M's H200 figures: 42.62 ms a 16 x 128-token step, 5.41 ms a raw batch-32 step):
        >>> b = burst_bound(32, 128, 128, 2048, 42.62, 5.41)
        >>> round(b), round(b / (32 / 5.41e-3), 3)  # tok/s, and its share of the raw batch-32 rate
        (5304, 0.897)
    """
    steps = -(-rows * prompt // per_step)
    return rows * tokens / ((steps * step_ms_ + (tokens - 1) * decode_ms) / 1e3)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- the client side (its own process: the server's threads never wait for the client's GIL) ---------

_CLIENTS: dict = {}


def clients(url: str, conc: int):
    """One httpx client and one openai client, shared by the client threads (both are thread-safe)
    and made before any timing: making a client costs tens of milliseconds of the GIL."""
    import httpx
    import openai

    if not _CLIENTS:
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        _CLIENTS["httpx"] = httpx.Client(base_url=url, timeout=600, limits=limits)
        _CLIENTS["openai"] = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                                           http_client=openai.DefaultHttpxClient(limits=limits))
    return _CLIENTS


def _http(url, prompt, n, stream):
    c = _CLIENTS["httpx"]
    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    first = None
    if not stream:
        r = c.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, None, r.json()["usage"]["completion_tokens"]
    with c.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"text": ""' not in line:
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, n


def _openai(url, prompt, n, stream):
    client = _CLIENTS["openai"]
    t0 = time.perf_counter()
    first = None
    if not stream:
        r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0)
        return time.perf_counter() - t0, None, r.usage.completion_tokens
    for c in client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, stream=True):
        if first is None and c.choices and c.choices[0].text:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, n


LOADS = ("one", "concurrent httpx", "steady httpx", "arrivals httpx", "concurrent openai", "arrivals openai")


def scenarios(url: str, prompts: list, n: int, conc: int, arrivals: int, over: float, load: str) -> dict:
    """Run one of `LOADS` against the server at `url`; returns its numbers."""
    clients(url, max(conc, arrivals))
    if load == "one":
        _http(url, prompts[0], 8, False)  # a first request
        with ThreadPoolExecutor(conc) as pool:  # open the connections
            list(pool.map(lambda p: _http(url, p, 2, False), prompts[:conc]))
        got = [_http(url, prompts[i], n, False) for i in range(5)]
        return {"s": statistics.median(t for t, _, _ in got), "tok/s": n / statistics.median(t for t, _, _ in got)}
    kind, name = load.split()
    ask = _http if name == "httpx" else _openai
    if kind == "steady":  # `over` is the duration here; starts spread over one request's time (`one`)
        t0, spread = time.perf_counter(), arrivals

        def client(i):
            time.sleep(i * spread / conc)
            k = 0
            while time.perf_counter() - t0 < over:
                ask(url, prompts[(i + k * conc) % len(prompts)], n, False)
                k += 1
            return k

        with ThreadPoolExecutor(conc) as pool:
            return {"requests": sum(pool.map(client, range(conc)))}
    futs = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(arrivals) as pool:
        for i in range(arrivals):
            time.sleep(max(0.0, t0 + i * over / arrivals - time.perf_counter()))
            futs.append(pool.submit(ask, url, prompts[i % len(prompts)], n, True))
        got = [f.result() for f in futs]
    lat, ttft = [t for t, _, _ in got], [f for _, f, _ in got]
    return {"ttft p50": pct(ttft, 50), "ttft p95": pct(ttft, 95), "lat p50": pct(lat, 50), "lat p95": pct(lat, 95)}


def _burst_group(url, prompts, n, name, barrier, out) -> None:
    """One client process of `burst`: its connections opened (a 2-token request each), then, once every
    group is ready, its requests sent at once; puts (start, end, completion tokens) in `out`."""
    clients(url, len(prompts))
    ask = _http if name == "httpx" else _openai
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda p: ask(url, p, 2, False), prompts))
    barrier.wait()
    t0 = time.time()  # wall clock: comparable across the groups' processes
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: ask(url, p, n, name == "openai"), prompts))
    out.put((t0, time.time(), sum(k for _, _, k in got)))


def burst(url: str, prompts: list, n: int, name: str, procs: int) -> dict:
    """`prompts` sent at once (streamed with the openai client, not with httpx) from `procs` client
    processes, each with a thread a request; tokens/s in all over the wall time from the first send to
    the last answer."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, len(prompts)))
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_burst_group, args=(url, prompts[i::procs], n, name, barrier, out)) for i in range(procs)]
    for p in ps:
        p.start()
    got = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    wall = max(e for _, e, _ in got) - min(s for s, _, _ in got)
    return {"tok/s": sum(k for _, _, k in got) / wall, "s": wall, "t0": min(s for s, _, _ in got),
            "end": max(e for _, e, _ in got)}


class Timeline:
    """What the server's worker did during a burst, on the wall clock the client processes use: each
    request's arrival (`engine.submit`), each prefill call and step launched (with the prompt chunks it
    carries, and how many of them end a prompt), and when each launch's tokens were read. On CUDA also
    the device's side: each launch's time on the device (events recorded around it) and the device's
    idle time between launches (the host late)."""

    def __init__(self, engine):
        self.engine, self.events = engine, []
        self._saved = (engine.submit, engine.runner.prefill, engine.runner.launch)
        submit, prefill, launch = self._saved
        cuda = getattr(engine.runner, "device", torch.device("cpu")).type == "cuda"

        def timed(run, kind, chunks):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else [None, None]
            if cuda:
                ev[0].record()
            p = run()
            if cuda:
                ev[1].record()
            tokens, ends = p.tokens, sum(c.sampling is not None for c in chunks)
            p.tokens = lambda: (tokens(), self.events.append(("read", time.time(), kind, ends, *ev, len(chunks))))[0]
            return p

        from mlx_bridge.serve.engine import StreamEnd

        def submitted(*a, **k):
            self.events.append(("submit", time.time(), 0, 0))
            job = submit(*a, **k)
            answered = lambda *_: self.events.append(("answer", time.time(), 0, 0))  # noqa: E731
            if job.emit is None:  # not streamed: the answer is the job's future
                job.future.add_done_callback(answered)
            else:  # streamed: each row's end event
                emit = job.emit
                job.emit = lambda ev: (answered() if isinstance(ev, StreamEnd) else None, emit(ev))[1]
            return job

        engine.submit = submitted
        engine.runner.prefill = lambda chunks: timed(lambda: prefill(chunks), "prefill", chunks)
        engine.runner.launch = lambda *a, chunks=(): timed(lambda: launch(*a, chunks=chunks) if chunks else launch(*a),
                                                           "mixed" if chunks else "step", chunks)

    def close(self) -> None:
        self.engine.submit, self.engine.runner.prefill, self.engine.runner.launch = self._saved

    def burst(self, t0: float, end: float) -> dict:
        """The events of a burst sent from `t0` whose last answer came at `end`, in ms from t0; on CUDA
        the device's busy and idle ms up to the last row's first token, and its median step after it."""
        ev = [e for e in self.events if e[1] >= t0]
        ms = lambda t: (t - t0) * 1e3  # noqa: E731
        reads = [e for e in ev if e[0] == "read"]
        firsts = [e[1] for e in reads if e[3]]
        out = {"arrived ms": ms(max(e[1] for e in ev if e[0] == "submit")),
               "prefill calls": sum(e[2] == "prefill" for e in reads), "mixed steps": sum(e[2] == "mixed" for e in reads),
               "steps": sum(e[2] in ("mixed", "step") for e in reads),
               "last first token ms": ms(max(firsts)) if firsts else float("nan"),
               "last token ms": ms(max(e[1] for e in reads)),
               "handed over ms": ms(max((e[1] for e in ev if e[0] == "answer"), default=float("nan"))),
               "answered ms": ms(end)}
        if reads and reads[0][4] is not None:
            torch.cuda.synchronize()
            done = max((i for i, e in enumerate(reads) if e[3]), default=-1)  # the launch of the last first token
            busy = [e[4].elapsed_time(e[5]) for e in reads]
            idle = [max(0.0, a[5].elapsed_time(b[4])) for a, b in zip(reads, reads[1:])]
            tail = [b for e, b in zip(reads[done + 1:], busy[done + 1:]) if e[2] == "step"]
            mid = statistics.median(tail) if tail else float("nan")
            out["launches to first"] = [(e[2], e[6], round(ms(e[1]), 1), round(b, 2)) for e, b in
                                        zip(reads[:done + 1], busy)]  # (kind, chunks, read at ms, device ms)
            out.update({"device busy ms to first": sum(busy[:done + 1]), "device idle ms to first": sum(idle[:done]),
                        "device idle ms after": sum(idle[done:]),
                        "tail step ms": mid, "tail steps ms": sum(tail), "tail": [round(b, 2) for b in tail],
                        "tail over median ms": sum(max(0.0, b - mid) for b in tail), "tail max ms": max(tail, default=mid)})
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(raw.SHAPES), default="llama2-7b")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--arrivals", type=int, default=64)
    ap.add_argument("--over", type=float, default=8.0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--steady", type=float, default=8.0, help="seconds of the clients-in-a-loop load")
    ap.add_argument("--stand-in", default=None, metavar="STEP_MS,PREFILL_MS",
                    help="replace the model's runner by waits: the server's host-side ceiling")
    ap.add_argument("--mixed-lanes", type=int, default=MIX[0], help="as `mlx-bridge serve --mixed-lanes` (0: off)")
    ap.add_argument("--mixed-tokens", type=int, default=MIX[1], help="as `mlx-bridge serve --mixed-tokens`")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes sending a burst (concurrent loads)")
    ap.add_argument("--loads", default=",".join(LOADS),
                    help=f"comma-separated, of {', '.join(LOADS)} (steady and arrivals need one)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    loads = [x.strip() for x in a.loads.split(",")]
    if not set(loads) <= set(LOADS) or ({"steady httpx", "arrivals httpx", "arrivals openai"} & set(loads)
                                        and "one" not in loads):
        ap.error(f"--loads {a.loads!r}: each of {', '.join(LOADS)}; steady and arrivals need one")
    loads = [x for x in LOADS if x in loads]
    if a.stand_in:
        a.shape = "tiny"

    from mlx_bridge.deploy.runners.fast import FastRunner
    from mlx_bridge.serve.app import ServerThread, create_app

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() and a.shape != "tiny" else "cpu"))
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    t = time.perf_counter()
    hf, native, cfg = raw.build(a.shape, dtype, dev)
    del hf
    runner = FastRunner(native)
    print(f"# {a.shape}, {dtype}, {card}, torch {torch.__version__}, mixed steps "
          f"{f'{a.mixed_lanes} x {a.mixed_tokens} tokens' if a.mixed_lanes else 'off'}: built in {time.perf_counter() - t:.0f} s",
          flush=True)

    res: dict = {"card": card, "shape": a.shape, "dtype": str(dtype)}
    if a.stand_in:
        step, pre = (float(x) / 1e3 for x in a.stand_in.split(","))
        card = res["card"] = f"stand-in runner ({a.stand_in} ms) on {card}"
        for B in (1, a.max_batch):  # the raw path prefills its B rows in one call (one wait)
            res[f"raw batch {B}"], res[f"raw whole batch {B}"] = B / step, B * a.tokens / ((a.tokens - 1) * step + pre)
    for B in (1, a.max_batch) if not a.stand_in else ():  # decode.py's raw figures, same weights, same run
        t = time.perf_counter()
        runner.prepare(batch_sizes=(B,), max_lens=(a.prompt + a.tokens,))
        tokens, pad = raw.prompts(B, a.prompt, cfg.vocab_size, dev)
        raw.run_steps(raw.fast_steps(runner, tokens, pad, a.tokens), dev)  # warm-up (as decode.bench_runner)
        first, rest, _ = raw.run_steps(raw.fast_steps(runner, tokens, pad, a.tokens), dev)
        res[f"raw batch {B}"] = rate = B * (a.tokens - 1) / rest  # decode.py's figure: the steps after the first token
        res[f"raw whole batch {B}"] = B * a.tokens / (first + rest)  # its prefill (one call for all B rows) too
        print(f"# raw fast path batch {B}: {rate:.1f} tok/s, {res[f'raw whole batch {B}']:.1f} with the prefill "
              f"(prepared + measured in {time.perf_counter() - t:.0f} s)", flush=True)
    runner._states.clear()  # the raw buckets' caches: the server has its own pool
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    model = deployed(native, cfg, dev, dtype, runner)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, cfg.vocab_size, (max(a.arrivals, a.max_batch), a.prompt), generator=g).tolist()
    t = time.perf_counter()
    app = create_app(model, model_name="m", max_batch=a.max_batch, max_len=a.max_model_len,
                     max_request_tokens=1 << 30, max_queue=4096,
                     mix=(a.mixed_lanes, a.mixed_tokens) if a.mixed_lanes else None)
    if a.stand_in:
        app.state.engine.runner = StandIn(a.max_batch, cfg.vocab_size, step, pre, a.prompt)
        app.state.engine.mix = None  # the stand-in has no mixed steps
    with ServerThread(app) as srv:
        res["ready s"] = time.perf_counter() - t
        engine = app.state.engine
        print(f"# server ready in {res['ready s']:.1f} s: {engine.prepared}; startup heap: {app.state.heap}", flush=True)
        if not a.stand_in:  # the served step alone (no row is busy: the steps change nothing a row reads)
            for B in (1, a.max_batch):
                res[f"step ms batch {B}"] = step_ms(engine.runner, B, a.prompt + a.tokens)
            if getattr(engine.runner, "mix", None):  # a mixed step: the decode rows and every lane full
                for n in engine.runner.mix_lanes:
                    res[f"mixed ms {n}"] = mixed_ms(engine.runner, a.max_batch, a.prompt + a.tokens, n)
                res["alone ms"] = mixed_ms(engine.runner, 0, a.prompt + a.tokens, engine.runner.mix_lanes[-1])
                if dev.type == "cuda":
                    res["after idle ms"] = after_idle_ms(engine.runner, a.prompt + a.tokens)
            for n in (1, max(getattr(engine.runner, "lanes", (1,)))):  # a prefill call (when no row decodes), full rows
                if engine.runner.fits([a.prompt] * n):
                    res[f"prefill ms {n}"] = prefill_ms(engine.runner, n, a.prompt)
        captures, graphs = engine.runner.stats["captures"], compiled()
        with mp.get_context("spawn").Pool(1) as pool:
            for load in loads:  # and where the worker's time goes under each
                before, steps, calls = dict(engine.timing), engine.metrics.steps, engine.runner.stats["prefills"]
                t1 = time.perf_counter()
                if load.startswith("steady"):  # the server's own token counter over the middle half of the run
                    job = pool.apply_async(scenarios, (srv.url, prompts, a.tokens, a.max_batch, res["one"]["s"],
                                                       a.steady, load))
                    time.sleep(a.steady / 4)
                    n0, m0, s0, w0 = (engine.metrics.generation_tokens, engine.runner.stats.get("mixed", 0),
                                      engine.metrics.steps, time.perf_counter())
                    time.sleep(a.steady / 2)
                    n1, m1, s1, w1 = (engine.metrics.generation_tokens, engine.runner.stats.get("mixed", 0),
                                      engine.metrics.steps, time.perf_counter())
                    res[load] = {**job.get(), "tok/s": (n1 - n0) / (w1 - w0), "steps": s1 - s0, "mixed": m1 - m0}
                elif load.startswith("concurrent"):
                    tl = Timeline(engine)
                    try:
                        res[load] = burst(srv.url, prompts[:a.max_batch], a.tokens, load.split()[1], a.client_procs)
                    finally:
                        tl.close()
                    res[load]["timeline"] = tl.burst(res[load].pop("t0"), res[load].pop("end"))
                else:
                    res[load] = pool.apply(scenarios, (srv.url, prompts, a.tokens, a.max_batch, a.arrivals, a.over,
                                                       load))
                res["worker " + load] = {
                    "wall s": time.perf_counter() - t1, "steps": engine.metrics.steps - steps,
                    "prefill calls": engine.runner.stats["prefills"] - calls,
                    **{k: v - before[k] for k, v in engine.timing.items()}}
        res["captures after ready"] = engine.runner.stats["captures"] - captures
        res["compiles after ready"] = compiled() - graphs
        res["max running"] = engine.metrics.max_running
    one = res["one"]["s"] if "one" in res else None
    print(f"\n# {a.shape} {dtype} on {card}; prompts {a.prompt} tokens, {a.tokens} new tokens each, greedy, "
          f"--max-batch {a.max_batch}; ready (every shape prepared) in {res['ready s']:.1f} s; "
          f"captures after ready: {res['captures after ready']}, compiles after ready: {res['compiles after ready']}\n")
    print("| load | served | raw decode (decode.py) | served / raw | raw with its prefill | served / that |")
    print("|---|---:|---:|---:|---:|---:|")
    r1, rb = res["raw batch 1"], res[f"raw batch {a.max_batch}"]
    w1, wb = res["raw whole batch 1"], res[f"raw whole batch {a.max_batch}"]
    for B, r in ((1, r1), (a.max_batch, rb)) if not a.stand_in else ():
        v = res[f"step ms batch {B}"]
        print(f"| decode step on the device, batch {B}, ms | {v:.2f} | {B / r * 1e3:.2f} | {B / r * 1e3 / v:.0%} | | |")
    for n in getattr(engine.runner, "mix_lanes", ()) if not a.stand_in else ():
        print(f"| mixed step on the device: batch {a.max_batch} + {n} x {engine.runner.mix[1]} prompt tokens, ms "
              f"| {res[f'mixed ms {n}']:.2f} | | | | |")
    if "alone ms" in res:
        lanes, C = engine.runner.mix_lanes[-1], engine.runner.mix[1]
        print(f"| mixed step on the device: no decode row + {lanes} x {C} prompt tokens, ms | {res['alone ms']:.2f} "
              f"| | | | |")
    if "after idle ms" in res:
        cold, warm = res["after idle ms"]
        print(f"| mixed step on the device: no decode row + 1 x {engine.runner.mix[1]} prompt tokens, after 2 s idle "
              f"/ right after, ms | {cold:.2f} / {warm:.2f} | | | | |")
    for n in (1, max(getattr(engine.runner, "lanes", (1,)))):
        if f"prefill ms {n}" in res:
            print(f"| prefill call on the device: {n} x {a.prompt} prompt tokens, ms | {res[f'prefill ms {n}']:.2f} "
                  f"| | | | |")
    if "one" in res:
        v = res["one"]["tok/s"]
        print(f"| one request at a time, tok/s | {v:.1f} | {r1:.1f} (batch 1) | {v / r1:.0%} | {w1:.1f} | {v / w1:.0%} |")
    clients_ = [c for c in ("httpx", "openai") if f"concurrent {c}" in res]
    for c in clients_:
        v = res[f"concurrent {c}"]["tok/s"]
        print(f"| {a.max_batch} concurrent ({c}, {a.client_procs} client processes), tok/s in all | {v:.0f} | {rb:.0f} (batch {a.max_batch}) | {v / rb:.0%} "
              f"| {wb:.0f} | {v / wb:.0%} |")
    if clients_ and "alone ms" in res:  # what no server can beat on this card: see `burst_bound`
        lanes, C = engine.runner.mix_lanes[-1], engine.runner.mix[1]
        widest = min(res["alone ms"], res[f"mixed ms {lanes}"])
        b = burst_bound(a.max_batch, a.prompt, a.tokens, lanes * C, widest, a.max_batch / rb * 1e3)
        print(f"| {a.max_batch} concurrent: the bound on this card (every prompt written by full {lanes}-lane steps "
              f"from the first send, {widest:.2f} ms each, then {a.tokens - 1} raw steps; nothing else), tok/s | "
              f"{b:.0f} | {rb:.0f} (batch {a.max_batch}) | {b / rb:.0%} | {wb:.0f} | {b / wb:.0%} |")
    for c in clients_:
        v = res[f"concurrent {c}"]["timeline"]
        print(f"| {a.max_batch} concurrent ({c}): the server's timeline from the first send, ms | last request in "
              f"{v['arrived ms']:.0f}; {v['prefill calls']} prefill calls, {v['mixed steps']} mixed steps; last first "
              f"token {v['last first token ms']:.0f}; {v['steps']} steps, last token {v['last token ms']:.0f}; "
              f"last answer handed over {v['handed over ms']:.0f}, received {v['answered ms']:.0f} | | | | |")
        if "tail step ms" in v:
            print(f"| {a.max_batch} concurrent ({c}): the device, ms | busy {v['device busy ms to first']:.0f} and idle "
                  f"{v['device idle ms to first']:.0f} up to the last first token, idle {v['device idle ms after']:.0f} "
                  f"after it; the steps after it: median {v['tail step ms']:.2f}, max {v['tail max ms']:.2f}, "
                  f"{v['tail steps ms']:.0f} in all, {v['tail over median ms']:.1f} over the median | | | | |")
            print(f"| {a.max_batch} concurrent ({c}): launches up to the last first token (kind, chunks, read at ms, "
                  f"device ms) | {'; '.join(' '.join(map(str, x)) for x in v['launches to first'])} | | | | |")
    v = res.get("steady httpx")
    if v:
        print(f"| {a.max_batch} clients in a loop (httpx), steady state: tok/s in all ({v['steps']} steps, {v['mixed']} "
              f"mixed) | {v['tok/s']:.0f} | {rb:.0f} (batch {a.max_batch}) | {v['tok/s'] / rb:.0%} | {wb:.0f} | "
              f"{v['tok/s'] / wb:.0%} |")
    for c in [c for c in ("httpx", "openai") if f"arrivals {c}" in res]:
        v = res[f"arrivals {c}"]
        print(f"| {a.arrivals} streamed over {a.over:g} s ({c}): first token p50 / p95 | {v['ttft p50'] * 1e3:.0f} / "
              f"{v['ttft p95'] * 1e3:.0f} ms | | | | |")
        print(f"| {a.arrivals} streamed over {a.over:g} s ({c}): whole request p50 / p95 | {v['lat p50']:.2f} / "
              f"{v['lat p95']:.2f} s | {one:.2f} s alone | p95 {v['lat p95'] / one:.2f}x | | |")
    print("\n| worker thread, seconds | wall | decode steps | prefill calls | idle | launching prefills | launching steps "
          "| waiting for tokens | text + events | other (admit, bookkeeping) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in loads:
        w = res["worker " + k]
        rest = w["wall s"] - w["idle"] - w["prefill"] - w["launch"] - w["wait"] - w["text"]
        print(f"| {k} | {w['wall s']:.2f} | {w['steps']} | {w['prefill calls']} | {w['idle']:.2f} | {w['prefill']:.3f} "
              f"| {w['launch']:.3f} | {w['wait']:.3f} | {w['text']:.3f} | {rest:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
