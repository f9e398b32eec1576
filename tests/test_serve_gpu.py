"""The served model on CUDA (skipped without a GPU): greedy answers under concurrency equal
`load().generate`, and nothing compiles or captures once the server says it is ready."""

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
        assert engine.runner.stats["captures"] == captures
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
