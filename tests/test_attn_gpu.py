"""Decode attention on CUDA (skipped without a GPU): the Triton kernel (`runners/attn_kernels.py`)
against SDPA in bfloat16 and against the module's eager attention (`layers.attend`) in float32, with
GQA, padding, sliding windows, softcap and gpt-oss sinks, and the mixed steps' lane kernel (`lanes`); the same cases run on CPU through Triton's
interpreter in tests/test_attn_triton.py. The decode step's q/k norm + rope + cache-write kernel
(`runners/rope_kernels.py`) against the fused path's PyTorch function (`fused.make_qkv`) in bfloat16
(float32 on CPU: tests/test_rope_triton.py)."""

import pytest
import torch
import torch.nn.functional as F

from mlx_bridge.deploy.native.layers import attend
from mlx_bridge.deploy.native.rope import cos_sin
from mlx_bridge.deploy.runners import fused as fm
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


def lanes_case(N, C, H, Hkv, S, D, window, seed=0, dtype=torch.float32, device="cpu"):
    """(q, kc, vc, slot, start, sinks) of N prompt lanes over a pool of 5 cache rows of S + 8 positions:
    lane 0 and 1 carry consecutive chunks of one prompt (row 2), lane 2 starts a prompt (row 0), a
    last lane (when N > 3) is padding (the scratch row 4, start 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N * C, 1, H, D, generator=g).to(dtype).to(device).transpose(1, 2)  # a view, as the step's
    kc, vc = (torch.randn(5, Hkv, S + 8, D, generator=g).to(dtype).to(device) for _ in range(2))
    buf = torch.tensor([[2, S // 4], [2, S // 4 + C], [0, 0], [4, 0]][:N], device=device)
    slot, start = buf[:, 0], buf[:, 1]  # strided columns, as a mixed step's lane buffer gives them
    sinks = torch.randn(H, generator=g).to(dtype).to(device)
    return q, kc, vc, slot, start, sinks


def lanes_eager(q, kc, vc, slot, start, S, window, cap, sinks):
    """Each lane through `layers.attend` in float64 over its row's first S keys, causal by position;
    NaN where a token sees no key (a padding token past the window)."""
    N = slot.shape[0]
    C = q.shape[0] // N
    out = []
    for i in range(N):
        qi = q[i * C:(i + 1) * C].transpose(0, 2)  # (1, H, C, D)
        pos = start[i] + torch.arange(C, device=q.device)
        d = pos[:, None] - torch.arange(S, device=q.device)
        m = (d >= 0) if window is None else (d >= 0) & (d < window)
        o = eager(qi, kc[slot[i], :, :S][None], vc[slot[i], :, :S][None], m[None, None], cap, sinks)
        out.append(o.transpose(1, 2).reshape(C, q.shape[1], 1, q.shape[-1]))
    return torch.cat(out)


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



@pytest.mark.parametrize("case", [(4, 128, 32, 32, 512, 128, None), (3, 32, 32, 8, 256, 128, 64), (2, 64, 8, 4, 256, 256, None)])
def test_lane_attention_bf16_equals_sdpa(case):
    """The mixed steps' lane kernel: llama-2-7b's heads, GQA with a window, head_dim 256."""
    from mlx_bridge.deploy.runners.attn_kernels import lanes

    N, C, H, Hkv, S, D, window = case
    q, kc, vc, slot, start, _ = lanes_case(N, C, H, Hkv, S, D, window, dtype=torch.bfloat16, device="cuda")
    out = lanes(q, kc, vc, slot, start, S, D ** -0.5, window)
    exact = lanes_eager(q, kc, vc, slot, start, S, window, None, None)
    seen = ~exact.isnan().flatten(1).any(1)
    assert seen[:3 * C].all()
    ref = torch.cat([F.scaled_dot_product_attention(
        q[i * C:(i + 1) * C].transpose(0, 2), kc[slot[i], :, :S][None], vc[slot[i], :, :S][None],
        attn_mask=((start[i] + torch.arange(C, device="cuda"))[:, None] >= torch.arange(S, device="cuda"))
        & ((start[i] + torch.arange(C, device="cuda"))[:, None] - torch.arange(S, device="cuda") < (window or S)),
        scale=D ** -0.5, enable_gqa=True).transpose(1, 2).reshape(C, H, 1, D) for i in range(len(slot))])
    err, ref_err = (out[seen].double() - exact[seen]).abs().max(), (ref[seen].double() - exact[seen]).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


ROPE_CASES = [  # (B, nh, nkv, hd, rotary dims, q/k norm, gemma, a slot per row)
    (1, 4, 2, 32, 32, True, False, False),  # qwen3: q/k norms, full rotary
    (3, 4, 2, 32, 32, True, False, True),  # rows at their own positions (continuous batching)
    (2, 4, 4, 32, 32, False, False, False),  # llama: rope only
    (2, 6, 2, 16, 16, True, True, False),  # gemma3: (1 + w) norms
    (2, 4, 2, 32, 16, True, False, False),  # glm4_moe: partial rotary (half the head)
    (1, 2, 1, 40, 40, False, False, False),  # head_dim 40: masked tail of the block
    (1, 32, 4, 128, 128, True, False, False),  # qwen3-30b-a3b
]


def rope_spec(nh, nkv, hd, qk, gemma):
    return fm.Spec(nh, nkv, hd, 1e-6, gemma, "silu", hd ** -0.5, None, qk, None, None)


def rope_inputs(B, nh, nkv, hd, rd, qk, gemma, rows, dtype, device, S=16, seed=0):
    """(x (B, 1, D), the layer's weight tuple, kc, vc, cos, sin, slots) of one decode step."""
    g = torch.Generator().manual_seed(seed)
    D = 24
    x = torch.randn(B, 1, D, generator=g)
    ln1 = 1 + 0.1 * torch.randn(D, generator=g)
    wqkv = torch.randn((nh + 2 * nkv) * hd, D, generator=g) * D ** -0.5
    qn, kn = ((1 + 0.3 * torch.randn(hd, generator=g)).to(dtype).to(device) if qk else None for _ in range(2))
    w = (ln1.to(dtype).to(device), None, None, None, wqkv.to(dtype).to(device), None, None, None, qn, kn, None)
    inv = 1.0 / (1e4 ** (torch.arange(0, rd, 2).float() / rd))
    slots = torch.randint(0, S, (B,) if rows else (1,), generator=g)
    pos = (slots[:, None] if rows else slots[None, :].expand(B, 1)) + torch.arange(B)[:, None] * 3  # any positions
    cos, sin = (t.to(device) for t in cos_sin(inv, 1.0, pos, dtype))  # (B, 1, 1, rd)
    kc, vc = (torch.randn(B, nkv, S, hd, generator=g).to(dtype).to(device) for _ in range(2))
    return x.to(dtype).to(device), w, kc, vc, cos, sin, slots.to(device)


def rope_case(B, nh, nkv, hd, rd, qk, gemma, rows, dtype, device):
    """((q, kc, vc) of `rope_kernels.rope_cache`, the same of `fused.make_qkv`) for one decode step."""
    from mlx_bridge.deploy.runners.rope_kernels import rope_cache

    x, w, kc, vc, cos, sin, slots = rope_inputs(B, nh, nkv, hd, rd, qk, gemma, rows, dtype, device)
    sp = rope_spec(nh, nkv, hd, qk, gemma)
    kr, vr = kc.clone(), vc.clone()
    q_ref = fm.make_qkv(sp, rows=rows)(x, w, kr, vr, cos, sin, slots)[0]
    qkv = F.linear(fm.rms(x, w[0], sp.eps, gemma), w[4])  # what the layer hands the kernel
    q = rope_cache(qkv.view(B, -1), w[8], w[9], cos, sin, kc, vc, slots, nh, nkv, sp.eps, gemma)
    return (q, kc, vc), (q_ref, kr, vr)


@pytest.mark.parametrize("c", ROPE_CASES)
def test_rope_cache_bf16_equals_make_qkv(c):
    """Each product and sum rounded to bfloat16 as eager rounds them: equal bits but where the float32
    statistics (sum order, rsqrt) differ in the last place and that flips the rounding of a normalised
    value (one unit of it, moved through rope's products and sum: a few units where the sum cancels)."""
    (q, kc, vc), (q_ref, kr, vr) = rope_case(*c, torch.bfloat16, "cuda")
    assert q.dtype == torch.bfloat16 and torch.equal(vc, vr)
    for a, b in ((q, q_ref), (kc, kr)):
        assert ((a.float() - b.float()).abs() <= 2 ** -6 * b.float().abs().clamp(min=1)).all()
        assert (a != b).float().mean() < 0.02
