"""MoE on CUDA (skipped without a GPU): the Triton routed-experts kernels against the PyTorch reference,
the compiled + captured fast path against the eager path and transformers, and a captured decode step
that reads only the routed experts (the others are poisoned with NaN)."""

import pytest
import torch

from mlx_bridge.deploy.generation import token_steps
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.native.moe import route
from mlx_bridge.deploy.runners.fast import FastRunner
from test_moe import routed_case, routed_error
from test_fast_gpu import PROMPTS, greedy, zoo  # noqa: F401  (the dense GPU tests' prompts, helper, fixture)

pytestmark = pytest.mark.gpu
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "phimoe", "glm4_moe", "deepseek_v3", "glm4_moe_lite"]


@pytest.mark.parametrize("gather", [False, True])  # rows grouped by expert; a block per row (decode)
@pytest.mark.parametrize("T", [1, 3, 8, 32, 200, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "gpt_oss_stacked"])
def test_routed_kernels_equal_reference(T, dtype, kind, gather):
    from mlx_bridge.deploy.runners.moe_kernels import routed

    if gather and T > 32:
        pytest.skip("a block per row is for decode")
    case = routed_case(kind, T, (64, 8, 256, 96), dtype, "cuda", seed=T)  # I = 96: masked tails
    x, w, idx, ex, glu = case
    err = routed_error(routed(x, w, idx, *ex, glu is not None, *(glu or (0.0, 0.0)), gather=gather), case)
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen2_moe", False), ("gpt_oss", True)])
def test_route_kernel_equals_route(kind, norm, dtype):
    from mlx_bridge.deploy.runners.moe_kernels import route_fused

    g = torch.Generator().manual_seed(0)  # distinct logits, exact in bfloat16: no ties to break
    logits = torch.stack([(torch.randperm(128, generator=g) - 64).float() / 16 for _ in range(40)]).to(dtype).cuda()
    w, idx = route_fused(logits, kind, 8, norm)
    ref_w, ref_idx = route(logits, kind, 8, norm)
    assert torch.equal(idx, ref_idx) and w.dtype == ref_w.dtype
    assert ((w.float() - ref_w.float()).abs() <= 4 * torch.finfo(w.dtype).eps * ref_w.abs().float()).all()


@pytest.mark.parametrize("arch", MOE)
def test_fast_greedy_equals_eager_float32(zoo, arch):
    d = zoo.hf(arch)
    ref = load(d, device="cuda", dtype="float32", fast=False).runner
    fast = FastRunner(load(d, device="cuda", dtype="float32", fast=False).module)
    assert fast.fused is not None and fast.use_graphs and fast.use_compile  # MoE layers compiled too
    want = greedy(ref, 24)
    assert greedy(fast, 24) == want
    cpu = load(d, dtype="float32").runner  # the PyTorch reference path
    assert list(token_steps(cpu, PROMPTS, 24, "cpu", temperature=0.0, top_p=1.0, top_k=0, seed=None)) == want


@pytest.mark.parametrize("arch", MOE)
def test_fast_bfloat16_close_to_transformers(zoo, arch):
    from transformers import AutoModelForCausalLM

    d = zoo.hf(arch)
    m = load(d, device="cuda", dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, m.config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids.cuda()).logits.float().cpu()
    got = m.logits(ids).float().cpu()
    # the dense tests' bound on the mean; rounding may flip a near-tie in the router at a few positions
    assert (got - ref).abs().mean().item() < 0.01 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    toks = torch.tensor([PROMPTS[2]], device="cuda")  # the fast path's prefill and decode steps
    fast = [m.runner.start(toks[:, :5], torch.zeros(1, dtype=torch.long, device="cuda"), 16)]
    for j in range(5, toks.shape[1]):
        fast.append(m.runner.next(toks[0, j:j + 1]))
    with torch.no_grad():
        want = hf(toks).logits[0, 4:].float()
    assert (torch.cat(fast) - want).abs().mean().item() < 0.01 * want.abs().max().item()


def _experts_used(module, tokens) -> dict:
    """layer -> set of expert ids the router picks for any position of `tokens` (B, L)."""
    used, hooks = {}, []
    for i, layer in enumerate(module.model.layers):
        moe = getattr(layer, layer.ffn_name)
        if hasattr(moe, "experts"):
            def hook(gate, inp, logits, i=i, moe=moe):
                used.setdefault(i, set()).update(moe.pick(logits)[1].flatten().tolist())
            hooks.append(moe.gate_linear.register_forward_hook(hook))
    with torch.inference_mode():
        module(tokens)
    for h in hooks:
        h.remove()
    return used


# phimoe, glm4_moe, deepseek_v3, glm4_moe_lite: routed in PyTorch ops
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "phimoe", "glm4_moe", "deepseek_v3", "glm4_moe_lite"])
def test_captured_step_reads_only_routed_experts(zoo, arch):
    """Unselected experts' weights set to NaN: the captured decode gives the same tokens, all finite.
    (The dense fallback computed every expert and weighted it by zero: NaN * 0 = NaN.)"""
    # 32 experts, top-2, 12 positions: about 15 of them unused per layer (16 left too few by chance)
    over = {"num_experts": 32} if arch == "qwen3_moe" else {"num_local_experts": 32}
    d = zoo.hf(arch, **over)
    m = load(d, device="cuda", dtype="float32")
    fast = m.runner
    prompt = torch.tensor([[1, 20, 21, 22]], device="cuda")
    pad = torch.zeros(1, dtype=torch.long, device="cuda")
    want = [t[0] for t in fast.steps(prompt, pad, 12)]  # compiles and captures bucket (1, 256)
    seq = torch.cat([prompt, torch.tensor([want[:-1]], device="cuda")], 1)
    used = _experts_used(m.module, seq)
    poisoned = 0
    for i, layer in enumerate(m.module.model.layers):
        moe = getattr(layer, layer.ffn_name)
        if i in used:
            for e in range(moe.stacked[0].shape[0]):
                if e not in used[i]:
                    for t in moe.stacked:  # gate_up, down (and gpt_oss's biases)
                        if t is not None:
                            t[e].fill_(float("nan"))
                    poisoned += 1
    assert poisoned >= 8  # most experts unused
    caps = fast.stats["captures"]
    got = list(fast.steps(prompt, pad, 12))
    assert fast.stats["captures"] == caps  # the same captured graphs replayed
    assert [t[0] for t in got] == want
    assert torch.isfinite(fast._st.logits).all()


def test_decode_blocks_timed_before_capture(zoo, monkeypatch):
    """The decode configurations differ only in block widths and pipeline depth (the same sums); `tuned`
    times them on the card, in the warm-up steps: no key is first met under a capture (nothing timed
    after it)."""
    from mlx_bridge.deploy.runners import moe_kernels as mk

    x, w, idx, ex, _ = routed_case("qwen3_moe", 1, (64, 8, 256, 96), torch.bfloat16, "cuda")
    ys = [mk.routed(x, w, idx, *ex, cfg=c, gather=True) for c in mk.DECODE_CONFIGS]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert torch.equal(mk.routed(x, w, idx, *ex), ys[0]) and (8, 64, 96, 256, torch.bfloat16, False, False) in mk._TUNED
    calls, tuned = [], mk.tuned

    def spy(key, run, *a, **kw):
        calls.append((key in mk._TUNED, torch.cuda.is_current_stream_capturing()))
        return tuned(key, run, *a, **kw)

    monkeypatch.setattr(mk, "tuned", spy)
    monkeypatch.setattr(mk, "_TUNED", {})  # this test's runner meets its shapes first
    m = load(zoo.hf("qwen3_moe"), device="cuda", dtype="bfloat16")
    prompt, pad = torch.tensor([[1, 20, 21, 22]], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    list(m.runner.steps(prompt, pad, 12))  # compiles, times and captures bucket (1, 256)
    assert (False, False) in calls and (True, True) in calls  # timed in the warm-up, found at capture
    assert (False, True) not in calls
