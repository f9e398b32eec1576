"""The fast decode path on CPU: fused functions, static buckets, stage hand-over and on-device sampling
against the eager `NativeRunner` (the reference), on tiny models of every native architecture."""

import pytest
import torch

from mlx_bridge.deploy.runners import sampling as fs
from mlx_bridge.deploy.runners.fast import FastRunner
from mlx_bridge.deploy.runners.shapes import bucket, len_bucket
from mlx_bridge.deploy.loader import load_across
from mlx_bridge.deploy.runners.pipeline import split_layers
from mlx_bridge.deploy.generation import token_steps
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.sampling import apply_top_k, apply_top_p
from mlx_bridge.errors import BridgeError
from mlx_bridge.testing.adapters import shared_zoo

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "qwen2_moe",
         "olmoe", "gpt_oss", "phimoe", "glm4_moe", "deepseek_v3", "glm4_moe_lite"]
PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47]]  # ragged: bucket 4


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def padded(prompts, pad_id=0):
    P = max(map(len, prompts))
    toks = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    return toks, torch.tensor([P - len(p) for p in prompts])


class StartNext:
    """A runner seen only through start/next (token_steps runs its own loop, not the runner's `steps`)."""

    def __init__(self, runner):
        self.start, self.next = runner.start, runner.next


# group routing in full (8 experts, 2 groups, one kept), and deepseek_v3's latent attention variants
GROUPED = [("glm4_moe", {"num_local_experts": 8, "n_group": 2, "topk_group": 1, "use_qk_norm": True}),
           ("deepseek_v3", {"num_local_experts": 8, "n_group": 2, "topk_group": 1, "attention_bias": True}),
           ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False})]


def greedy_steps(runner, n, prompts=PROMPTS):
    return list(token_steps(runner, prompts, n, "cpu", temperature=0.0, top_p=1.0, top_k=0, seed=None))


@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHS] + [("mistral", {"sliding_window": 8}),
                                                                        ("gemma2", {"sliding_window": 8}),
                                                                        *GROUPED])
def test_greedy_and_logits_equal_eager(zoo, arch, overrides):
    d = zoo.hf(arch, **overrides)
    ref, fast = load(d).runner, FastRunner(load(d).module)
    assert fast.use_graphs is False and fast.use_compile is False  # CPU: the same code, not captured
    assert fast.fused is not None  # MoE layers too, latent attention too
    n = 40 if overrides else 16  # past the window of 8
    want = greedy_steps(ref, n)
    assert greedy_steps(StartNext(fast), n) == want  # start/next interface
    assert greedy_steps(fast, n) == want  # token_steps hands the loop to fast.steps
    assert list(fast.steps(*padded(PROMPTS), n)) == want  # on-device loop, host sync every 8 steps
    toks, pad = padded(PROMPTS)
    a, b = ref.start(toks, pad, 32), fast.start(toks, pad, 32)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    t = a.argmax(-1)
    for _ in range(3):
        a, b = ref.next(t), fast.next(t)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
        t = a.argmax(-1)


def test_fusion_keeps_names_and_memory(zoo):
    d = zoo.hf("qwen2")  # q/k/v biases fused too
    m = load(d)
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    fast = FastRunner(m.module)
    after = m.module.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    attn, w = m.module.model.layers[1].self_attn, fast.fused.layers[1].w
    assert attn.v_proj.weight.untyped_storage().data_ptr() == w[4].untyped_storage().data_ptr()
    assert attn.q_proj.bias.untyped_storage().data_ptr() == w[5].untyped_storage().data_ptr()
    mlp = m.module.model.layers[0].mlp
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == fast.fused.layers[0].w[11].untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_stage_handover_equals_one_stage(zoo, arch):
    d = zoo.hf(arch)
    ref = load(d).runner
    fast = FastRunner(load(d).module, split_at=(1,))
    assert [s.layers for s in fast.segments] == [[0], [1]]
    assert greedy_steps(fast, 12) == greedy_steps(ref, 12)
    assert list(fast.steps(*padded(PROMPTS), 12)) == greedy_steps(ref, 12)
    ids = torch.tensor([PROMPTS[2]])
    torch.testing.assert_close(fast.logits(ids), ref.logits(ids), rtol=0, atol=2e-5)


def test_load_across_devices_generates_like_load(zoo):
    d = zoo.hf("llama")
    m = load_across(d, devices=["cpu", "cpu"])
    assert isinstance(m.runner, FastRunner)
    assert m.generate(["give three tips", "hello"], max_tokens=10) == load(d).generate(["give three tips", "hello"], max_tokens=10)
    assert split_layers([10] * 4, 0, 20, 2) == [0, 0, 0, 1]


def test_buckets_are_reused_and_bounded(zoo):
    fast = FastRunner(load(zoo.hf("llama")).module)
    greedy_steps(fast, 4, PROMPTS)  # 3 rows -> bucket 4
    greedy_steps(fast, 4, PROMPTS + [[1, 5]])  # 4 rows: same bucket, same cache
    assert fast.stats["buckets"] == 1
    toks, pad = padded(PROMPTS)
    fast.start(toks, pad, toks.shape[1] + 2)
    fast.next(torch.tensor([5, 6, 7]))
    assert (bucket(3), bucket(33), len_bucket(257)) == (4, 64, 512)
    fast._slot = fast._max_len
    with pytest.raises(BridgeError, match="past the cache length"):
        fast.next(torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("min_len,grow,n_short,repeat,n_long", [
    (8, 8, 10, 4, 40),  # buckets 32 -> 64 -> 128: the same moves in a few tokens
    pytest.param(256, 256, 300, 40, 700, marks=pytest.mark.slow),  # the sizes a server uses
])
def test_cache_grows_to_the_next_bucket_mid_generation(zoo, min_len, grow, n_short, repeat, n_long):
    """A request starts in the length bucket of its prompt + `grow` positions and moves to a bigger one
    when it needs it: the same tokens as the eager runner, which allocates the whole length up front."""
    d = zoo.hf("gemma2", sliding_window=8)  # sliding window and softcap across the move
    ref, fast = load(d).runner, FastRunner(load(d).module, min_len=min_len, grow_ahead=grow)
    want = greedy_steps(ref, n_short)  # prompts of 9 tokens at most: 9 + n_short positions fit the first bucket
    first = len_bucket(9 + grow, min_len)
    assert 9 + n_short <= first
    assert list(fast.steps(*padded(PROMPTS), n_short)) == want
    assert fast.stats["grown"] == 0
    long = [p * repeat for p in PROMPTS]  # starts in the bucket of its prompt + grow, needs more
    P = 9 * repeat
    start, need = len_bucket(P + grow, min_len), len_bucket(P + n_long - 1, min_len)
    assert need > start > first
    want = greedy_steps(ref, n_long, long)
    assert list(fast.steps(*padded(long), n_long)) == want
    assert fast.stats["grown"] == 1 and sorted(S for _, S in fast._states) == [first, need]  # `start` given up
    assert greedy_steps(StartNext(fast), n_long, long) == want  # start/next moves the same way
    assert fast.stats["grown"] == 2


@pytest.mark.slow  # torch.compile on CPU: most of a minute
def test_compiled_decode_equals_eager_bf16_without_recompiling(zoo):
    d = zoo.hf("qwen3")  # GQA, q/k norms
    ref = load(d, dtype="bfloat16").runner
    fast = FastRunner(load(d, dtype="bfloat16").module, compile=True)
    want = greedy_steps(ref, 12)
    assert greedy_steps(fast, 12) == want
    with torch.compiler.set_stance("fail_on_recompile"):  # same bucket, other prompts: no compile
        assert list(fast.steps(*padded(PROMPTS[:2] + [[1, 9, 8]]), 12)) == greedy_steps(ref, 12, PROMPTS[:2] + [[1, 9, 8]])


# -- on-device sampling -----------------------------------------------------------------------------

def test_filters_match_sampling_py():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for top_p, top_k in [(0.9, 0), (0.5, 0), (1.0, 5), (0.7, 3), (1.0, 0), (0.95, 1)]:
        lp = logits.log_softmax(-1)
        want = lp
        if top_p < 1:
            want = apply_top_p(want, top_p)
        if top_k > 0:
            want = apply_top_k(want, top_k)
        got = fs.filtered_logprobs(logits, torch.full((6,), top_p), torch.full((6,), top_k))
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (top_p, top_k)


def test_pick_greedy_rows_and_distribution():
    n = 3000  # draws per setting: rows of one batch (each row its own noise)
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).repeat(4 * n, 1)
    temp = torch.tensor([0.0, 1.0, 1.0, 0.5]).repeat_interleave(n)
    top_k = torch.tensor([0, 1, 0, 0]).repeat_interleave(n)
    t = fs.pick(logits, temp, torch.ones(4 * n), top_k, torch.full((4 * n,), 7), torch.tensor([3])).view(4, n)
    counts = torch.stack([torch.bincount(r, minlength=4) for r in t]).float()
    assert counts[0, 2] == n and counts[1, 2] == n  # temperature 0 and top_k 1: the argmax
    for row, T in [(2, 1.0), (3, 0.5)]:
        p = torch.softmax(logits[0] / T, -1)
        assert (counts[row] / n - p).abs().max() < 0.03, (counts[row] / n, p)


def test_noise_is_uniform_and_seeded():
    u = fs.uniform(torch.tensor([1, 2]), torch.tensor([0]), 20000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, fs.uniform(torch.tensor([1, 2]), torch.tensor([0]), 20000))
    assert not torch.equal(u[0], u[1])  # rows differ even for equal seeds
    assert not torch.equal(u, fs.uniform(torch.tensor([1, 2]), torch.tensor([1]), 20000))


def test_sampled_steps_are_reproducible_and_filtered(zoo):
    fast = FastRunner(load(zoo.hf("llama")).module)
    toks, pad = padded(PROMPTS)
    a = list(fast.steps(toks, pad, 12, temperature=0.9, top_k=2, seed=5))
    assert a == list(fast.steps(toks, pad, 12, temperature=0.9, top_k=2, seed=5))
    assert a != list(fast.steps(toks, pad, 12, temperature=0.9, top_k=2, seed=6))
    # every sampled token is one of the two most likely under the eager model given the same history
    ref = load(zoo.hf("llama")).runner
    logits = ref.start(toks, pad, toks.shape[1] + 12)
    for row in a:
        assert all(t in logits[b].topk(2).indices.tolist() for b, t in enumerate(row))
        logits = ref.next(torch.tensor(row))


def test_load_fast_flag_wires_the_runner(zoo):
    d = zoo.hf("llama")
    eager = load(d)
    assert type(eager.runner).__name__ == "NativeRunner"  # CPU default: the eager runner
    fast = load(d, fast=True)
    assert isinstance(fast.runner, FastRunner)
    prompts = ["hello there", "a b c d e f"]
    assert fast.generate(prompts, max_tokens=12) == eager.generate(prompts, max_tokens=12)
    assert "".join(fast.stream("hello there", max_tokens=12)) == eager.generate("hello there", max_tokens=12)
    a = fast.generate("hello", max_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert a == fast.generate("hello", max_tokens=12, temperature=0.8, top_k=20, seed=3)
    with pytest.raises(BridgeError, match="fast=True needs a native class"):
        load(d, backend="transformers", fast=True)
    with pytest.raises(BridgeError, match="devices="):
        load(d, backend="transformers", devices=["cpu", "cpu"])
    across = load(d, devices=["cpu", "cpu"])
    assert isinstance(across.runner, FastRunner)
    assert across.generate(prompts, max_tokens=12) == eager.generate(prompts, max_tokens=12)


def test_generate_cli_fast_flag(zoo, capsys):
    from mlx_bridge.cli import main

    d = zoo.hf("llama")
    assert main(["generate", str(d), "--prompt", "hello", "-m", "8", "--device", "cpu", "--ignore-chat-template"]) == 0
    eager = capsys.readouterr().out
    assert main(["generate", str(d), "--prompt", "hello", "-m", "8", "--device", "cpu", "--fast",
                 "--ignore-chat-template"]) == 0
    assert capsys.readouterr().out == eager


def test_phimoe_longrope_greedy_equals_eager(tmp_path):
    """phimoe's position-dependent rope scale (short/long mscale, `cos_sin` on the device) in the fused path:
    generation runs past the original context of 16."""
    from mlx_bridge.testing.adapters import tiny_hf_model
    from test_deploy_models import PHIMOE_LONGROPE

    d = tmp_path / "phimoe-longrope"
    tiny_hf_model(d, "phimoe", rope_parameters=PHIMOE_LONGROPE)
    ref, fast = load(d).runner, FastRunner(load(d).module)
    assert fast.fused is not None and isinstance(fast.fused.ropes[0][1], tuple)
    want = greedy_steps(ref, 20)
    assert greedy_steps(fast, 20) == want
    assert list(fast.steps(*padded(PROMPTS), 20)) == want
