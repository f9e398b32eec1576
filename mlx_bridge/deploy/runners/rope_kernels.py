"""The decode step's q/k norms, rope and KV-cache writes on CUDA as one Triton kernel.

After the fused `[q; k; v]` projection of one token a row, `fused.make_qkv` runs the per-head RMSNorms
of q and k (qwen3, gemma3, glm4_moe ...), rope on q and k (full or partial rotary) and the two cache
writes; compiled by inductor that is three or four small kernels a layer, each costing more in launch
and tail than in bytes. `_qk_rope_cache` does it all in one launch, a program per (row, head): a
query head normalises, rotates and writes its q; a kv head normalises and rotates its key and writes
it and its value into the cache at the row's slot.

Numerics are `make_qkv`'s: statistics in float32, `w * n.to(dtype)` (gemma: `(n (1 + w)).to(dtype)`),
`x cos + rotate_half(x) sin` with each product and the sum rounded to the activation dtype as eager
rounds them (compiled without floating-point contraction, as inductor compiles the layer's own kernels
when it emulates casts). `qk_rope_cache` is a `torch.library.custom_op` that mutates the caches: opaque to the
compiled layer, written in place, captured in the step's CUDA graph.

Example:
    >>> q = rope_cache(qkv, qn, kn, cos, sin, kc, vc, slot, nh=32, nkv=4, eps=1e-6)  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope(src, w_ptr, cos, sin, offs, partner, sign, dm, HD, eps, NORM: tl.constexpr, GEMMA: tl.constexpr):
    """One head's values at `offs` (BD,) normalised and rotated, in the activation dtype (float32 values).
    `partner`/`sign`: rotate_half's source index and sign for each index (itself and 0 past the rotary dims)."""
    x = tl.load(src + offs, mask=dm, other=0.0)
    xp = tl.load(src + partner, mask=dm, other=0.0)
    dt = x.dtype
    if NORM:
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, 0) / HD + eps)
        w = tl.load(w_ptr + offs, mask=dm, other=0.0)
        wp = tl.load(w_ptr + partner, mask=dm, other=0.0)
        if GEMMA:  # (n (1 + w)) in float32, then the cast
            x = (xf * r * (1.0 + w.to(tl.float32))).to(dt)
            xp = (xp.to(tl.float32) * r * (1.0 + wp.to(tl.float32))).to(dt)
        else:  # w * n.to(dtype), the product in the activation dtype
            x = (w.to(tl.float32) * (xf * r).to(dt).to(tl.float32)).to(dt)
            xp = (wp.to(tl.float32) * (xp.to(tl.float32) * r).to(dt).to(tl.float32)).to(dt)
    a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = (xp.to(tl.float32) * sign * sin).to(dt).to(tl.float32)
    return (a + b).to(dt)


@triton.jit
def _qk_rope_cache(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, NH, NKV, HD, RD, eps,
                   s_qkv, s_cos, s_slot, sqb, sqh, skb, skh, sks, svb, svh, svs,
                   BD: tl.constexpr, NORM: tl.constexpr, GEMMA: tl.constexpr):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = tl.arange(0, BD)
    dm = offs < HD
    half = RD // 2
    rot = offs < RD
    partner = tl.where(rot, tl.where(offs < half, offs + half, offs - half), offs)
    sign = tl.where(rot, tl.where(offs < half, -1.0, 1.0), 0.0)
    cos = tl.load(cos_ptr + b * s_cos + offs, mask=rot, other=1.0).to(tl.float32)  # 1 past the rotary dims
    sin = tl.load(sin_ptr + b * s_cos + offs, mask=rot, other=0.0).to(tl.float32)
    row = qkv_ptr + b * s_qkv
    if h < NH:
        y = _norm_rope(row + h * HD, qn_ptr, cos, sin, offs, partner, sign, dm, HD, eps, NORM, GEMMA)
        tl.store(q_ptr + b * sqb + h * sqh + offs, y, mask=dm)
    else:
        j = h - NH
        slot = tl.load(slot_ptr + b * s_slot)
        y = _norm_rope(row + (NH + j) * HD, kn_ptr, cos, sin, offs, partner, sign, dm, HD, eps, NORM, GEMMA)
        tl.store(kc_ptr + b * skb + j * skh + slot * sks + offs, y, mask=dm)
        v = tl.load(row + (NH + NKV + j) * HD + offs, mask=dm)
        tl.store(vc_ptr + b * svb + j * svh + slot * svs + offs, v, mask=dm)


def rope_cache(qkv: torch.Tensor, qn: torch.Tensor | None, kn: torch.Tensor | None, cos: torch.Tensor,
               sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor, nh: int, nkv: int,
               eps: float, gemma: bool = False) -> torch.Tensor:
    """q (B, nh, 1, hd) from one token a row's projection qkv (B, (nh + 2 nkv) hd): per-head RMSNorm with
    qn/kn (None: no q/k norms), rope with cos/sin (B|1, ..., rd), rd <= hd (partial rotary: the first rd
    dims); the row's key and value written into kc/vc (B, nkv, S, hd) at `slots` (1,) (shared by the rows)
    or (B,) (each row's own). What `fused.make_qkv` computes for L = 1.

    Example:
        >>> q = rope_cache(qkv, None, None, cos, sin, kc, vc, torch.tensor([5]), 8, 2, 1e-5)  # doctest: +SKIP
    """
    B = qkv.shape[0]
    hd, rd = kc.shape[-1], cos.shape[-1]
    assert qkv.shape[-1] == (nh + 2 * nkv) * hd and qkv.stride(-1) == 1 and rd <= hd and rd % 2 == 0, (qkv.shape, rd)
    assert kc.stride(-1) == 1 and vc.stride(-1) == 1
    qkv = qkv.reshape(B, -1)
    cos, sin = cos.reshape(cos.shape[0], rd).contiguous(), sin.reshape(sin.shape[0], rd).contiguous()
    q = torch.empty(B, nh, 1, hd, dtype=qkv.dtype, device=qkv.device)
    norm = qn is not None
    with torch.cuda.device(qkv.device) if qkv.is_cuda else nullcontext():
        _qk_rope_cache[(B, nh + nkv)](
            qkv, qn if norm else qkv, kn if norm else qkv, cos, sin, q, kc, vc, slots, nh, nkv, hd, rd, float(eps),
            qkv.stride(0), cos.stride(0) if cos.shape[0] > 1 else 0, slots.stride(0) if slots.numel() > 1 else 0,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            BD=triton.next_power_of_2(hd), NORM=norm, GEMMA=gemma, num_warps=1 if hd <= 128 else 2,
            enable_fp_fusion=False)  # no FMA across the roundings (inductor's emulate_precision_casts does the same)
    return q


@torch.library.custom_op("mlx_bridge::qk_rope_cache", mutates_args=("kc", "vc"))
def qk_rope_cache(qkv: torch.Tensor, qn: torch.Tensor | None, kn: torch.Tensor | None, cos: torch.Tensor,
                  sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor, nh: int, nkv: int,
                  eps: float, gemma: bool) -> torch.Tensor:
    """`rope_cache` as one op (opaque to torch.compile, the caches written in place)."""
    return rope_cache(qkv, qn, kn, cos, sin, kc, vc, slots, nh, nkv, eps, gemma)


@qk_rope_cache.register_fake
def _(qkv, qn, kn, cos, sin, kc, vc, slots, nh, nkv, eps, gemma):
    return qkv.new_empty(qkv.shape[0], nh, 1, kc.shape[-1])
