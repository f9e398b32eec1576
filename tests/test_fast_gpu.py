"""The fast path on CUDA (skipped without a GPU): compiled + graph-captured decode against the eager
`NativeRunner`, no recompilation or re-capture between requests, no host sync per step, two GPUs."""

import pytest
import torch

from mlx_bridge.deploy.runners.fast import FastRunner
from mlx_bridge.deploy.generation import token_steps
from mlx_bridge.deploy.loader import load, load_across
from mlx_bridge.testing.adapters import shared_zoo

pytestmark = pytest.mark.gpu
PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def greedy(runner, n, prompts=PROMPTS):
    return list(token_steps(runner, prompts, n, "cuda", temperature=0.0, top_p=1.0, top_k=0, seed=None))


def padded(prompts):
    P = max(map(len, prompts))
    return (torch.tensor([[0] * (P - len(p)) + p for p in prompts], device="cuda"),
            torch.tensor([P - len(p) for p in prompts], device="cuda"))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral"])
def test_graph_decode_equals_eager_float32(zoo, arch):
    d = zoo.hf(arch)
    ref = load(d, device="cuda", dtype="float32", fast=False).runner
    fast = FastRunner(load(d, device="cuda", dtype="float32", fast=False).module)
    assert fast.use_graphs and fast.use_compile
    want = greedy(ref, 24)
    assert greedy(fast, 24) == want
    assert list(fast.steps(*padded(PROMPTS), 24)) == want
    assert fast.stats["captures"] >= 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_decode_low_precision_differs_only_at_near_ties(zoo, dtype):
    """Greedy runs agree until the first step where the eager top two logits are within rounding."""
    d = zoo.hf("llama")
    ref = load(d, device="cuda", dtype=dtype, fast=False).runner
    fast = FastRunner(load(d, device="cuda", dtype=dtype, fast=False).module)
    toks, pad = padded(PROMPTS)
    a, b = ref.start(toks, pad, 64), fast.start(toks, pad, 64)
    alive = torch.ones(3, dtype=torch.bool, device="cuda")
    for _ in range(32):
        top2 = a.topk(2, dim=-1).values
        near_tie = (top2[:, 0] - top2[:, 1]) <= 0.02 * top2[:, 0].abs().clamp(min=1)
        same = a.argmax(-1) == b.argmax(-1)
        assert bool((same | near_tie | ~alive).all()), (a.argmax(-1), b.argmax(-1))
        alive &= same
        t = a.argmax(-1)  # teacher-forced: both continue from the eager token
        a, b = ref.next(t), fast.next(t)
    assert bool(alive.any())


def test_no_recompile_or_recapture_between_requests(zoo):
    fast = FastRunner(load(zoo.hf("llama"), device="cuda", dtype="bfloat16", fast=False).module)
    greedy(fast, 8)  # bucket (4 rows, 256 positions): compile and capture
    list(fast.steps(*padded(PROMPTS[:2]), 20))  # bucket (2 rows, 256): its own compile and capture
    list(fast.steps(*padded(PROMPTS), 20, temperature=0.7, top_p=0.9, seed=1))  # sampling graph
    caps = fast.stats["captures"]
    other = [[1, 9, 8, 7], [1, 33], [1, 50, 51], [1, 60]]
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompilation raises
        greedy(fast, 12, other)
        list(fast.steps(*padded(other[:3]), 30))
        list(fast.steps(*padded(other[1:3]), 9))
        list(fast.steps(*padded(other), 30, temperature=1.0, top_k=3, seed=2))
    assert fast.stats["captures"] == caps


def test_sampling_on_device_is_seeded_and_top_k_1_is_greedy(zoo):
    fast = FastRunner(load(zoo.hf("llama"), device="cuda", dtype="float32", fast=False).module)
    toks, pad = padded(PROMPTS)
    a = list(fast.steps(toks, pad, 16, temperature=0.8, top_p=0.95, seed=11))
    assert a == list(fast.steps(toks, pad, 16, temperature=0.8, top_p=0.95, seed=11))
    assert list(fast.steps(toks, pad, 16, temperature=0.8, top_k=1, seed=3)) == list(fast.steps(toks, pad, 16))


def test_no_host_sync_in_decode_steps(zoo):
    fast = FastRunner(load(zoo.hf("qwen3"), device="cuda", dtype="bfloat16", fast=False).module)
    toks, pad = padded(PROMPTS)
    t = fast.next(fast.start(toks, pad, 64).argmax(-1)).argmax(-1)  # the first step compiles and captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            t = fast.next(t).argmax(-1)  # device tensors in, device tensors out
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_two_gpus_equal_one(zoo, arch):
    d = zoo.hf(arch)
    one = load(d, device="cuda:0", dtype="float32")
    two = load_across(d, devices=["cuda:0", "cuda:1"], dtype="float32")
    assert [s.device.index for s in two.runner.segments] == [0, 1]
    prompts = ["give three tips", "hello", "what is two plus two"]
    want = one.generate(prompts, max_tokens=16)
    assert two.generate(prompts, max_tokens=16) == want
    assert load(d, devices=["cuda:0", "cuda:1"], dtype="float32").generate(prompts, max_tokens=16) == want
    ids = torch.tensor([[1, 20, 21, 22]])
    torch.testing.assert_close(two.logits(ids).cpu(), one.logits(ids).cpu(), rtol=0, atol=1e-4)


def test_graph_decode_grows_the_cache_like_eager(zoo):
    """Compiled + captured decode that moves to a bigger length bucket mid-generation: eager's tokens."""
    d = zoo.hf("llama")
    ref = load(d, device="cuda", dtype="float32", fast=False).runner
    fast = FastRunner(load(d, device="cuda", dtype="float32", fast=False).module)
    long = [p * 40 for p in PROMPTS]  # starts in bucket 1024 (360 + 256 positions), needs 360 + 700 - 1
    want = greedy(ref, 700, long)
    assert list(fast.steps(*padded(long), 700)) == want
    assert fast.stats["grown"] == 1


def test_prepare_leaves_nothing_to_compile_or_capture(zoo):
    m = load(zoo.hf("llama"), device="cuda", dtype="bfloat16")
    m.runner.prepare(batch_sizes=(1, 4), max_lens=(256,), modes=("greedy", "sample"))
    caps = m.runner.stats["captures"]
    ids = [m.encode_prompt(p) for p in ["give three tips", "hello", "what is two plus two"]]
    with torch.compiler.set_stance("fail_on_recompile"):
        m.complete(ids, max_tokens=40)
        m.complete(ids[:1], max_tokens=40, temperature=0.8, top_p=0.9, seed=1)
        m.complete(ids, max_tokens=40, temperature=0.7)
    assert m.runner.stats["captures"] == caps
