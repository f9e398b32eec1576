"""The served model on CUDA (skipped without a GPU): greedy answers under concurrency equal
`load().generate` (rows joining while others decode, their prompts riding on the decode steps: mixed
steps, a long prompt in several lanes), and nothing compiles or captures once the server says it is ready."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from mlx_bridge.deploy.loader import load
from mlx_bridge.testing.adapters import shared_zoo

pytestmark = pytest.mark.gpu
PROMPTS = ["give three tips", "hello", "what is two plus two", "reverse the list of words please",
           "one two three four five six", "why is the sky", "write code", "the model " * 150]  # > 256 positions: the second length bucket


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def test_served_greedy_equals_generate_and_nothing_compiles_after_ready(zoo):
    from mlx_bridge.serve.app import ServerThread, create_app

    d = zoo.hf("llama", max_position_embeddings=1024)
    ref = load(d, device="cuda", dtype="float32", fast=False)  # float32: eager and compiled agree token for token
    want = {p: ref.generate(p, max_tokens=24, chat=False) for p in PROMPTS}  # /v1/completions: no chat template
    m = load(d, device="cuda", dtype="float32")  # the fast path, as `serve --device cuda` loads it
    app = create_app(m, model_name="t", max_batch=4, batch_sizes=(1, 4), max_len=600)
    with ServerThread(app) as srv:
        engine = app.state.engine
        assert engine.runner.use_graphs and engine.runner.use_compile
        captures = engine.runner.stats["captures"]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

        def ask(i):
            p = PROMPTS[i % len(PROMPTS)]
            body = {"model": "t", "prompt": p, "max_tokens": 24, "temperature": 0}
            if i % 3 == 2:  # sampled requests share the batch (the sampling graphs)
                body.update(temperature=0.8, top_p=0.9, seed=i)
            return p, i % 3 == 2, httpx.post(srv.url + "/v1/completions", json=body, timeout=300).json()

        with torch.compiler.set_stance("fail_on_recompile"), ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(24)))
        greedy = [(p, a["choices"][0]["text"]) for p, sampled, a in answers if not sampled]
        assert [a for _, a in greedy] == [want[p] for p, _ in greedy]
        assert engine.alive and engine.metrics.max_running > 1
        assert engine.runner.stats["mixed"] > 0  # rows joined through mixed steps
        assert engine.runner.stats["captures"] == captures
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_mixed_steps_in_cuda_graphs_give_each_rows_tokens(zoo):
    """The slot pool's compiled and captured steps, used as the engine uses them: the row in slot 0
    starts by a mixed step with no decode rows, the one in slot 2 rides on its first decode step, then a
    long prompt in 16-token chunks, up to 4 lanes a step, rides on the steps of both (the long one fills
    slot 1, inside the decoding batch); every row's greedy tokens equal `complete`'s alone, no prefill
    call is made, and `prepare` captured every shape the steps take."""
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    m = load(zoo.hf("llama", max_position_embeddings=1024), device="cuda", dtype="float32", fast=False)
    m.eos_token_ids = set()
    a, b, long = (m.encode_prompt(p) for p in (PROMPTS[0], PROMPTS[2], PROMPTS[-1]))
    want = [m.complete([x], max_tokens=8)[0].token_ids for x in (a, long, b)]
    r = SlotRunner(m.module, rows=4, max_len=512, compile=True, graphs=True, batch_sizes=(1, 4), mix=(4, 16))
    r.prepare()
    captures, g = r.stats["captures"], RowSampling()

    def lanes(slot, ids):  # a short prompt in 16-token lanes
        assert len(ids) <= 64
        return [Chunk(slot, ids[i:i + 16], i, g if i + 16 >= len(ids) else None) for i in range(0, len(ids), 16)]

    got = {0: [r.launch([], len(a), True, chunks=lanes(0, a)).tokens()[0]], 1: [], 2: []}
    step = r.launch([0], max(len(a) + 1, len(b)), True, chunks=lanes(2, b)).tokens()
    got[0].append(step[0])
    got[2].append(step[2])
    at = 0
    while len(got[1]) < 8:
        chunks = []
        while at < len(long) and len(chunks) < 4:
            n = min(16, len(long) - at)
            chunks.append(Chunk(1, long[at:at + n], at, g if at + n == len(long) else None))
            at += n
        busy = [0, 2] if chunks else [0, 1, 2]
        need = max(len(a) + len(got[0]), len(b) + len(got[2]), len(long) + len(got[1]))
        step = r.launch(busy, need, True, chunks=chunks).tokens()
        for s in (0, 1, 2):
            if s in step:
                got[s].append(step[s])
    assert [got[s][:8] for s in (0, 1, 2)] == want
    assert r.stats["mixed"] == 2 + -(-len(long) // 64) and r.stats["prefills"] == 0
    assert r.stats["captures"] == captures


def test_steps_captured_on_first_use_carry_their_prompts(zoo):
    """Without `prepare` (`serve --no-prepare`) each step's graph is captured when a launch first needs
    it, and capturing clears the lanes' input buffer: the prompt chunks of that launch must still reach
    it (a mixed step copied them in before capturing, and its newcomer's chunk was lost)."""
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    m = load(zoo.hf("llama"), device="cuda", dtype="float32", fast=False)
    m.eos_token_ids = set()
    a, b = (m.encode_prompt(p) for p in (PROMPTS[0], PROMPTS[2]))
    assert len(b) <= 16
    want = [m.complete([x], max_tokens=4)[0].token_ids for x in (a, b)]
    r = SlotRunner(m.module, rows=4, max_len=256, compile=False, graphs=True, batch_sizes=(1, 4), mix=(4, 16))
    g = RowSampling()
    got = {0: [r.prefill([Chunk(0, a, 0, g)]).tokens()[0]], 1: []}
    step = r.launch([0], len(a) + 1, True, chunks=[Chunk(1, b, 0, g)]).tokens()  # captured here
    got[0].append(step[0])
    got[1].append(step[1])
    for i in range(3):
        step = r.launch([0, 1], max(len(a), len(b)) + 2 + i, True).tokens()
        got[0].append(step[0])
        got[1].append(step[1])
    assert [got[0][:4], got[1][:4]] == want
    assert r.stats["mixed"] == 1 and r.stats["captures"] >= 3
