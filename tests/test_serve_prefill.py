"""Prefill in the server (CPU, tiny models): newcomers are prefilled together in one call, with rows
and lengths padded as the CUDA graphs pad them, and the worker never waits for a prefill before it
launches the next decode step."""

from __future__ import annotations

import time

import pytest

from mlx_bridge.testing import tiny_hf_model

PROMPTS = ["give three tips", "what is two plus two", "hello", "reverse the list of words please"]


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request, tmp_path_factory):
    from mlx_bridge import load

    m = load(tiny_hf_model(tmp_path_factory.mktemp("pre") / request.param, request.param))
    m.eos_token_ids = set()  # random weights: rows run to their max_tokens
    return m


def test_padded_prefill_of_rows_together_gives_the_tokens_each_gets_alone(model):
    """Three rows in one call (padded to 4 lanes of 64 tokens, as on CUDA), one of them the first
    chunk of a longer prompt finished by a second call at its offset; then decode steps together."""
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    long = model.encode_prompt(" ".join(PROMPTS * 3))
    ids = [long, *(model.encode_prompt(p) for p in PROMPTS[:2])]
    assert len(long) > 16 and max(map(len, ids[1:])) <= 64
    want = [model.complete([x], max_tokens=6)[0].token_ids for x in ids]
    r = SlotRunner(model.module, rows=4, max_len=256, compile=False, graphs=False, chunk=256)
    r.padded = True  # the CUDA shapes, run eagerly
    g = RowSampling()
    first = r.prefill([Chunk(0, long[:16], 0), Chunk(1, ids[1], 0, g), Chunk(2, ids[2], 0, g)]).tokens()
    first.update(r.prefill([Chunk(0, long[16:], 16, g)]).tokens())
    got = {s: [first[s]] for s in range(3)}
    for i in range(5):
        step = r.launch([0, 1, 2], max(map(len, ids)) + i + 1, greedy=True).tokens()
        for s in range(3):
            got[s].append(step[s])
    assert r.stats["prefills"] == 2 and [got[s] for s in range(3)] == want


def test_each_launch_keeps_its_tokens_until_they_are_read(model):
    """The worker reads a round's tokens after the next round's launches, and a round may launch
    several prefills: four prefills and a step launched before any is read still give each row its
    own tokens (a ring of two host buffers gave a row another row's first token on CUDA)."""
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    ids = [model.encode_prompt(p) for p in PROMPTS]
    want = [model.complete([x], max_tokens=2)[0].token_ids for x in ids]
    assert len({w[0] for w in want}) > 1  # a mix-up would show
    r = SlotRunner(model.module, rows=4, max_len=256, compile=False, graphs=False, chunk=256)
    launched = [r.prefill([Chunk(s, x, 0, RowSampling())]) for s, x in enumerate(ids)]
    launched.append(r.launch([0, 1, 2, 3], max(map(len, ids)) + 1, greedy=True))
    got = [p.tokens() for p in launched]
    assert [[got[s][s], got[4][s]] for s in range(4)] == want
    assert got[0] is launched[0].tokens()  # read once


def test_the_graph_paths_lane_uploads_give_each_row_its_tokens(model, monkeypatch):
    """The CUDA path's lanes reach the device through pinned rings of two (`steps.Uploads`): run here
    with graphs that replay eagerly, prefills and mixed steps launched before any is read give each row
    the tokens it gets alone."""
    import torch

    from mlx_bridge.deploy.runners import prefill
    from mlx_bridge.deploy.runners.mixed import mixed_run
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    class Eager:  # a captured graph: replaying it runs the step
        def __init__(self, run):
            self.replay = run

    def prefill_graph(r, N, C, S):
        buf = r._pbufs.setdefault((N, C), torch.zeros(N, C + 4, dtype=torch.long))
        return Eager(lambda: prefill.prefill_run(r, buf, N, C, S)), buf

    monkeypatch.setattr(prefill, "prefill_graph", prefill_graph)
    ids = [model.encode_prompt(p) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2])]
    a, b, c, d = ids  # c: two chunks, a prefill's and a mixed step's
    assert 2 < len(c) <= 18 and len(d) <= 16
    want = [model.complete([x], max_tokens=4)[0].token_ids for x in ids]
    r = SlotRunner(model.module, rows=4, max_len=256, compile=False, graphs=False, chunk=256, mix=(4, 16))
    r.use_graphs = r.padded = True
    r._graph = lambda B, S, mode, mixed=0: Eager(
        lambda: mixed_run(r, r._mbuf[:mixed], B, S, mode) if mixed else r._run(B, S, mode))
    g, n = RowSampling(), max(map(len, ids))
    launched = [r.prefill([Chunk(0, a, 0, g), Chunk(1, b, 0, g)]), r.prefill([Chunk(2, c[:2], 0)]),
                r.launch([0, 1], n + 1, True, chunks=[Chunk(2, c[2:], 2, g)]),
                r.launch([0, 1, 2], n + 2, True, chunks=[Chunk(3, d, 0, g)])]
    launched += [r.launch([0, 1, 2, 3], n + 3 + i, True) for i in range(3)]
    got: dict = {}
    for p in launched:
        for s, t in p.tokens().items():
            got.setdefault(s, []).append(t)
    assert [got[s][:4] for s in range(4)] == want
    assert r.stats["mixed"] == 2 and r.stats["prefills"] == 2


def burst(eng, ids: list[list[int]]) -> list[list[int]]:
    """Greedy 4-token requests, all waiting when `eng`'s worker starts; their tokens."""
    from mlx_bridge.serve.protocol import Sampling

    jobs = [eng.submit(lambda m, x=x: ([x], Sampling(max_tokens=4, temperature=0.0))) for x in ids]
    eng.start()
    try:
        return [j.future.result(timeout=120)[0].token_ids for j in jobs]
    finally:
        eng.stop()


def test_newcomers_admitted_together_are_prefilled_in_one_call(model):
    from mlx_bridge.serve.engine import Engine

    ids = [model.encode_prompt(p) for p in PROMPTS]
    want = [model.complete([x], max_tokens=4)[0].token_ids for x in ids]
    eng = Engine(model, max_batch=4, mix=None)  # the separate-prefill path
    assert burst(eng, ids) == want and eng.runner.stats["prefills"] == 1


@pytest.mark.parametrize("calls", [1, 4])
def test_a_burst_of_newcomers_is_prefilled_before_the_next_decode_step(model, calls):
    """Eight newcomers take two prefill calls (four rows a call): with `prefill_calls` 4 both come
    before the first decode step (the burst's last rows do not wait for steps of its first ones),
    with 1 a step comes between them; the tokens are each row's alone either way."""
    from mlx_bridge.serve.engine import Engine

    ids = [model.encode_prompt(p) for p in PROMPTS * 2]
    want = [model.complete([x], max_tokens=4)[0].token_ids for x in ids]
    eng = Engine(model, max_batch=8, prefill_calls=calls, mix=None)  # the separate-prefill path
    log: list[str] = []
    for kind in ("prefill", "launch"):
        fn = getattr(eng.runner, kind)
        setattr(eng.runner, kind, lambda *a, fn=fn, kind=kind, **k: log.append(kind) or fn(*a, **k))
    assert burst(eng, ids) == want and log.count("prefill") == 2
    assert log[:3] == (["prefill", "prefill", "launch"] if calls > 1 else ["prefill", "launch", "prefill"])


def test_the_worker_launches_the_next_step_before_reading_a_prefill(model):
    """A long prompt is prefilled a chunk a round while a running row keeps decoding, and no prefill's
    tokens are read before the decode step of its round is launched (prefill does not stall)."""
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    short, long = model.encode_prompt(PROMPTS[2]), model.encode_prompt(" ".join(PROMPTS * 3))
    want = [model.complete([x], max_tokens=40)[0].token_ids for x in (short, long)]
    eng = Engine(model, max_batch=2, prefill_chunk=8, mix=None)  # the separate-prefill path
    log: list = []
    runner, prefill, launch = eng.runner, eng.runner.prefill, eng.runner.launch

    def spy(kind, fn):
        def call(*a, **k):
            p = fn(*a, **k)
            n = len(log)
            log.append((kind, n))
            read = p.tokens
            p.tokens = lambda: (log.append(("read", n)), read())[1]
            return p
        return call

    runner.prefill, runner.launch = spy("prefill", prefill), spy("launch", launch)
    eng.start()
    try:
        a = eng.submit(lambda m: ([short], Sampling(max_tokens=40, temperature=0.0)))
        t = time.monotonic()
        while eng.metrics.generation_tokens < 3:  # the short row is decoding
            assert eng.alive and time.monotonic() - t < 60, "the short row never decoded"
            time.sleep(0.001)
        b = eng.submit(lambda m: ([long], Sampling(max_tokens=40, temperature=0.0)))
        got = [a.future.result(timeout=120)[0].token_ids, b.future.result(timeout=120)[0].token_ids]
    finally:
        eng.stop()
    assert got == want
    calls = [e for e in log if e[0] != "read"]
    chunks = [i for i, e in enumerate(calls) if e[0] == "prefill"][1:]  # the long prompt's chunks
    assert len(chunks) >= len(long) // 8 and all(calls[i + 1][0] == "launch" for i in chunks)  # decoding between
    for n, (kind, _) in enumerate(log):
        if kind == "prefill":
            read = log.index(("read", n), n) if ("read", n) in log else None
            launched = [e for e in log[n + 1:read] if e[0] == "launch"]
            assert read is None or launched, f"prefill {n} read before any step was launched after it"


def test_the_compiled_step_writes_each_rows_key_in_place(model):
    """The decode step's cache write, compiled as the server compiles it (`compile_rows`), touches only
    the rows' new positions: a `scatter_` there was compiled as a copy of the whole cache and back, per
    layer and step (on an H200 the 32-row step took 24.5 ms where the raw batch-1 step takes 5.5 ms).
    Batch 1 and the first larger batch compile a graph each; a third batch size reuses the second
    (its batch dimension is symbolic), so start-up does not compile once per batch size."""
    import re
    from unittest import mock

    import torch
    from torch._inductor.graph import GraphLowering

    from mlx_bridge.deploy.runners import fused as fm
    from mlx_bridge.deploy.runners.slots import compile_rows

    f = fm.fuse(model.module)
    spec, L, (inv, scale) = f.spec, f.layers[0], f.ropes[f.layers[0].rope]
    S = 1000  # a cache length that appears nowhere else in the generated code
    kc = torch.zeros(5, spec.nkv, S, spec.hd)
    vc = torch.zeros_like(kc)
    big = (str(spec.nkv * S * spec.hd), str(S * spec.hd))  # a cache row, a head's keys of a row
    torch._dynamo.reset()
    qkv = compile_rows(fm.make_qkv(spec, rows=True))
    codes: list[str] = []
    for B, pos in ((1, [7]), (3, [5, 999, 0]), (2, [3, 4])):
        kc.zero_()
        vc.zero_()
        x, pos = torch.randn(B, 1, f.embed.shape[1]), torch.tensor(pos)
        cos, sin = fm.cos_sin(inv, scale, pos[:, None], torch.float32)
        with torch.inference_mode(), mock.patch.object(GraphLowering, "save_output_code", codes.append):
            q, k, v = qkv(x, L.w, kc[:B], vc[:B], cos, sin, pos)
        for b, p in enumerate(pos.tolist()):
            torch.testing.assert_close(kc[b, :, p], k[b, :, 0])
            torch.testing.assert_close(vc[b, :, p], v[b, :, 0])
        assert kc[B:].abs().sum() == 0 and kc[:B].abs().sum(dim=(1, 3)).count_nonzero() == B  # nothing else written
    assert len(codes) == 2, f"{len(codes)} graphs compiled for batch sizes 1, 3, 2"
    for code in codes:  # the C++ kernels' loop bounds: B, heads, head dim; never a cache row's length
        bounds = re.findall(r"<\s*static_cast<int64_t>\(([^;]*)\);", code)
        assert bounds and not [b for b in bounds if any(n in b for n in big)], "the compiled step copies the cache"
