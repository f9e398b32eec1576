"""The decode attention kernel and the mixed steps' lane kernel (`deploy/runners/attn_kernels.py`) on CPU through Triton's interpreter,
in float32 (the interpreter's bfloat16 `tl.dot` is wrong; bfloat16 against SDPA runs in
tests/test_attn_gpu.py), against the module's eager attention (`layers.attend`): GQA, left padding,
sliding windows, bool and additive masks, softcap, gpt-oss sinks, one split and several (with splits
past the cache's end and splits whose keys are all masked). Skipped without triton, and where CUDA is
present (the GPU tests run them)."""

import pytest
import torch

from triton_interpreter import use_interpreter_or_skip

use_interpreter_or_skip("tests/test_attn_gpu.py")

from mlx_bridge.deploy.loader import load  # noqa: E402
from mlx_bridge.deploy.runners import attn_kernels as ak  # noqa: E402
from mlx_bridge.deploy.runners import fused as fm  # noqa: E402
from mlx_bridge.deploy.runners.fast import FastRunner  # noqa: E402
from test_attn_gpu import decode_case, eager, lanes_case, lanes_eager  # noqa: E402
from test_fast import PROMPTS, padded, zoo  # noqa: E402, F401  (the CPU fast-path tests' prompts and models)

CASES = [  # (B, H, Hkv, S, D, window, softcap, sinks)
    (1, 8, 2, 64, 32, None, None, False),
    (3, 8, 2, 64, 40, None, None, False),  # head_dim 40: masked tail
    (3, 4, 4, 64, 16, 16, None, False),  # no GQA, a window: early splits all masked
    (2, 8, 1, 64, 32, 24, None, True),  # gpt-oss: sinks, a window
    (2, 6, 2, 64, 32, None, 5.0, False),  # softcap, 3 query heads a kv head
    (1, 2, 1, 64, 8, None, None, False),  # head_dim 8: padded to the 16 tl.dot needs
]


@pytest.mark.parametrize("n", [1, 4, 8])  # splits of 16 keys: with 8 splits some lie past the cache
@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_equals_eager(case, additive, n):
    B, H, Hkv, S, D, window, cap, sinks = case
    q, k, v, mask, s = decode_case(B, H, Hkv, S, D, torch.float32, window=window, additive=additive, sinks=sinks, seed=n)
    out = ak.decode(q, k, v, mask, D ** -0.5, cap, s, BN=16, n_splits=n)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - eager(q, k, v, mask, cap, s)).abs().max() < 1e-5


def test_decode_attention_broadcast_mask():
    q, k, v, mask, _ = decode_case(2, 8, 2, 64, 32, torch.float32)
    one = mask[:1]  # (1, 1, 1, S): the same mask for every row
    out = ak.decode(q, k, v, one, 32 ** -0.5, BN=16, n_splits=2)
    assert (out.double() - eager(q, k, v, one.expand(2, -1, -1, -1))).abs().max() < 1e-5


def test_decode_attention_default_blocks_short_cache():
    q, k, v, mask, _ = decode_case(2, 8, 2, 16, 32, torch.float32)  # 16 positions: one block, masked tail
    out = ak.decode(q, k, v, mask, 32 ** -0.5)
    assert (out.double() - eager(q, k, v, mask)).abs().max() < 1e-5


def test_splits():
    assert ak.splits(1, 4, 512, 64) == 8 and ak.splits(1, 4, 512, 32) == 16 and ak.splits(1, 4, 64, 64) == 1
    assert ak.splits(32, 4, 512, 64) == 2 and ak.splits(32, 8, 8192, 64) == 1


def test_decode_attention_op_traces_in_a_compiled_function():
    """The custom op's schema and fake output under torch.compile (aot_eager: no inductor on CPU)."""
    q, k, v, mask, s = decode_case(2, 8, 2, 64, 32, torch.float32, window=24, sinks=True)
    f = torch.compile(lambda q, k, v, m, s: ak.decode_attention(q, k, v, m, 0.2, None, s) + 1, backend="aot_eager",
                      fullgraph=True)
    assert torch.equal(f(q, k, v, mask, s), ak.decode(q, k, v, mask, 0.2, None, s) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides", [("qwen3_moe", {}), ("gpt_oss", {}), ("gemma2", {"sliding_window": 4}),
                                            ("deepseek_v3", {})])  # one key head: the latent rows
def test_fast_path_decoding_through_the_kernel_equals_eager(zoo, arch, overrides, monkeypatch):
    """The fast path's decode steps (uncompiled on CPU) with the kernel in place of `_decode_attend`,
    as on CUDA: its real cache, masks (padding, windows), sinks and softcap; logits equal eager's."""
    calls = []

    def kernel(q, kc, vc, mask, scale, softcap, sinks=None):
        calls.append(mask.shape)
        return ak.decode(q, kc, vc, mask, scale, softcap, sinks)

    monkeypatch.setattr(fm, "_decode_attend", kernel)
    d = zoo.hf(arch, **overrides)
    ref, fast = load(d).runner, FastRunner(load(d).module, min_len=16, grow_ahead=4)
    toks, pad = padded(PROMPTS)
    a, b = ref.start(toks, pad, 40), fast.start(toks, pad, 40)
    t = a.argmax(-1)
    for _ in range(12):  # 9 + 12 positions: past the window of 4, and across the 16-position bucket
        a, b = ref.next(t), fast.next(t)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
        t = a.argmax(-1)
    assert calls and fast.stats["grown"] == 1


LANE_CASES = [  # (N, C, H, Hkv, S, D, window, softcap, sinks)
    (3, 16, 8, 2, 64, 32, None, None, False),
    (4, 24, 8, 2, 96, 40, None, None, False),  # C not a block multiple, head_dim 40, a padding lane
    (3, 16, 6, 2, 64, 32, 20, None, False),  # 3 query heads a kv head, a window
    (2, 32, 4, 4, 64, 16, None, 5.0, False),  # no GQA, softcap
    (3, 16, 8, 1, 64, 32, 24, None, True),  # gpt-oss: sinks, a window
]


@pytest.mark.parametrize("blocks", [(16, 16), (None, None)])
@pytest.mark.parametrize("case", LANE_CASES)
def test_lane_attention_equals_eager(case, blocks):
    N, C, H, Hkv, S, D, window, cap, sinks = case
    q, kc, vc, slot, start, s = lanes_case(N, C, H, Hkv, S, D, window)
    s = s if sinks else None
    out = ak.lanes(q, kc, vc, slot, start, S, D ** -0.5, window, cap, s, *blocks)
    ref = lanes_eager(q, kc, vc, slot, start, S, window, cap, s)
    assert out.shape == q.shape and out.dtype == q.dtype
    seen = ~ref.isnan().flatten(1).any(1)  # tokens that see a key (every real one)
    assert seen[:3 * C].all()
    assert (out[seen].double() - ref[seen]).abs().max() < 1e-5
    assert out[~seen].eq(0).all() and out.isfinite().all()
