"""Decode attention on CUDA (skipped without a GPU): the Triton kernel (`runners/attn_kernels.py`)
against SDPA in bfloat16 and against the module's eager attention (`layers.attend`) in float32, with
GQA, padding, sliding windows, softcap and gpt-oss sinks; the same cases run on CPU through Triton's
interpreter in tests/test_attn_triton.py."""

import pytest
import torch
import torch.nn.functional as F

from mlx_bridge.deploy.native.layers import attend
from mlx_bridge.deploy.runners.fused import rope_masks

pytestmark = pytest.mark.gpu


def decode_case(B: int, H: int, Hkv: int, S: int, D: int, dtype, device: str = "cpu", seed: int = 0,
                window: int | None = None, additive: bool = True, sinks: bool = False):
    """(q, k, v, mask, sinks) of one decode step at slot S - S // 4 with rows left-padded 0, 3, 6, ...:
    q (B, H, 1, D) a transposed view as the fast path's, the cache (B, Hkv, S, D), the fast path's
    mask (`rope_masks`) for `window`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).to(device).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(device) for _ in range(2))
    slot = torch.tensor([S - S // 4], device=device)
    pad = (torch.arange(B, device=device) * 3).clamp(max=S - S // 4)
    _, ms = rope_masks([], slot, pad, S, [window] if window else [], dtype, additive)
    s = torch.randn(H, generator=g).to(dtype).to(device) if sinks else None
    return q, k, v, ms[window], s


def eager(q, k, v, mask, softcap=None, sinks=None):
    """`layers.attend` in float64 (the reference)."""
    m = mask if mask.dtype == torch.bool else mask.double()
    return attend(q.double(), k.double(), v.double(), m, q.shape[-1] ** -0.5, softcap,
                  None if sinks is None else sinks.double())


CASES = [  # (B, H, Hkv, S, D, window, softcap, sinks)
    (1, 32, 4, 512, 128, None, None, False),  # qwen3-30b-a3b at batch 1
    (8, 32, 4, 512, 128, None, None, False),
    (32, 32, 4, 1024, 128, None, None, False),
    (3, 64, 8, 256, 64, 128, None, True),  # gpt-oss: window layer and sinks
    (3, 64, 8, 256, 64, None, None, True),
    (2, 8, 4, 256, 256, None, 50.0, False),  # gemma-2: softcap, head_dim 256
    (2, 12, 2, 256, 80, 64, None, False),  # head_dim 80: masked tail
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("additive", [True, False])
def test_decode_attention_float32_equals_eager(case, additive):
    from mlx_bridge.deploy.runners.attn_kernels import decode

    B, H, Hkv, S, D, window, cap, sinks = case
    q, k, v, mask, s = decode_case(B, H, Hkv, S, D, torch.float32, "cuda", window=window, additive=additive, sinks=sinks)
    out = decode(q, k, v, mask, D ** -0.5, cap, s)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - eager(q, k, v, mask, cap, s)).abs().max() < 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c[6] is None and not c[7]])
def test_decode_attention_bf16_equals_sdpa(case):
    from mlx_bridge.deploy.runners.attn_kernels import decode

    B, H, Hkv, S, D, window = case[:6]
    q, k, v, mask, _ = decode_case(B, H, Hkv, S, D, torch.bfloat16, "cuda", window=window)
    out = decode(q, k, v, mask, D ** -0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5, enable_gqa=True)
    exact = eager(q, k, v, mask)
    # both round p to bfloat16 before p v: within a few bfloat16 units of the float64 result alike
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3


def test_decode_attention_captured_in_a_graph():
    from mlx_bridge.deploy.runners.attn_kernels import decode_attention

    q, k, v, mask, _ = decode_case(1, 32, 4, 512, 128, torch.bfloat16, "cuda")
    f = torch.compile(lambda q, k, v, m: decode_attention(q, k, v, m, 128 ** -0.5, None, None) * 2, fullgraph=True)
    ref = f(q, k, v, mask)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f(q, k, v, mask)
    k.mul_(-1)  # new keys: the replay must read them
    g.replay()
    assert not torch.equal(out, ref)
    assert torch.equal(out, f(q, k, v, mask))
