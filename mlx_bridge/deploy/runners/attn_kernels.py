"""Decode attention on CUDA with Triton: one query token a row over a static KV cache (flash-decoding).

    o[b, h] = softmax(scale q[b, h] . k[b, h / G]^T + mask[b]) v[b, h / G]      G = H / H_kv

`_partial`: a program per (row, kv head, split of the cache): the G query heads of a kv head read
its keys and values once (GQA without repeated keys), an online softmax in float32 over the split's
keys in blocks of BN; it writes the split's max, sum and unnormalised output. `_combine`: a program
per (row, head) merges the splits (and adds gpt-oss's sink to the denominator). With one split the
first kernel normalises and writes the output itself. A batch-1 decode step of a small model has 4 kv
heads: the cache is cut into enough splits to keep ~2 programs an SM busy, each at least BN keys.

The mask is the fast path's own (`fused.rope_masks`: (B|1, 1, 1, S), additive 0/-inf, or bool), so
padding, causality and sliding windows come out as in `layers.attend`; softcap (Gemma-2:
tanh(s / c) c) and sinks (gpt-oss: a per-head softmax column whose value is dropped) too. Scores
and the softmax are float32 (the eager sinks formula rounds them to the activation dtype; SDPA's
kernels round p to it before p v); the output is in q's dtype.
`decode_attention` is a `torch.library.custom_op`: opaque to the compiled layer, captured in the
step's CUDA graph (static shapes, no host sync, no tuning).

`lanes` (a mixed step's prompt chunks, `mixed.py`): N lanes of C query tokens, lane i's tokens at
positions start[i] + [0, C) of cache row slot[i], each attending causally (and within the window)
over that row's keys, read in place: no copy of the row, no mask tensor. A program per (lane, kv
head, block of BM tokens) runs the BM x G queries of its kv head over the keys up to its last
position (flash attention's loop, the online softmax of `_partial`).

Example:
    >>> o = decode(q, kc, vc, mask, 128 ** -0.5)   # q (B, H, 1, hd), kc/vc (B, H_kv, S, hd) cuda  # doctest: +SKIP
    >>> o = lanes(q, kc, vc, slot, start, 256, 128 ** -0.5)  # q (N * C, H, 1, hd), kc/vc the pool  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl


@triton.jit
def _scores(q, k, scale, cap, CAP: tl.constexpr, IEEE: tl.constexpr):
    """Scores (rows, BN) float32 of queries q (rows, BD) against keys k (BN, BD), softcapped with CAP."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if CAP:  # tanh(s / cap) * cap, tanh(x) = 1 - 2 / (exp(2x) + 1)
        s = (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0)) * cap
    return s


@triton.jit
def _online(s, v_ptrs, kv_mask, m_i, l_i, acc, IEEE: tl.constexpr):
    """One block of masked scores s (rows, BN) into the online softmax (max m_i, sum l_i), its values
    (loaded from v_ptrs after the scores) weighted into acc (rows, BD); returns (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with every key masked
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _sink(sk, m_i, l_i, acc):
    """gpt-oss's sink logits sk (rows,) folded into the softmax: a column whose value is dropped."""
    m_all = tl.maximum(m_i, sk)
    return l_i * tl.exp(m_i - m_all) + tl.exp(sk - m_all), acc * tl.exp(m_i - m_all)[:, None]


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, pm_ptr, pl_ptr, po_ptr, sink_ptr, H, G, S, D, chunk, scale, cap,
             sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sob, soh, SPLITS: tl.constexpr, BG: tl.constexpr,
             BN: tl.constexpr, BD: tl.constexpr, CAP: tl.constexpr, BOOL: tl.constexpr, SINK: tl.constexpr,
             FINAL: tl.constexpr, IEEE: tl.constexpr):
    Hkv = H // G
    pid, sp = tl.program_id(0), tl.program_id(1)
    b, hk = pid // Hkv, pid % Hkv
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, BD)
    gmask, dmask = offs_g < G, offs_d < D
    heads = hk * G + offs_g  # (BG,) query heads of kv head hk
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # (BG, BD)
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m_i = tl.full((BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, BD), tl.float32)
    start = sp * chunk
    for n0 in range(start, start + chunk, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < S
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kb + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        s = _scores(q, k, scale, cap, CAP, IEEE)  # (BG, BN)
        mrow = tl.load(m_ptr + b.to(tl.int64) * smb + offs_n, mask=nmask, other=0)
        if BOOL:
            s = tl.where(mrow[None, :] != 0, s, float("-inf"))
        else:
            s = s + mrow.to(tl.float32)[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = _online(s, vb + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :], kv_mask, m_i, l_i,
                                acc, IEEE)
    if FINAL:  # one split: normalise here
        if SINK:
            l_i, acc = _sink(tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32), m_i, l_i, acc)
        out = acc / l_i[:, None]
        tl.store(o_ptr + b.to(tl.int64) * sob + heads[:, None] * soh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        row = (b * H + heads).to(tl.int64) * SPLITS + sp  # (BG,) partials laid out (B, H, SPLITS[, BD])
        tl.store(pm_ptr + row, m_i, mask=gmask)
        tl.store(pl_ptr + row, l_i, mask=gmask)
        tl.store(po_ptr + row[:, None] * BD + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _combine(pm_ptr, pl_ptr, po_ptr, o_ptr, sink_ptr, H, D, sob, soh, SPLITS: tl.constexpr, BD: tl.constexpr,
             SINK: tl.constexpr):
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BD)
    row = pid.to(tl.int64) * SPLITS + offs_s
    m = tl.load(pm_ptr + row)
    l = tl.load(pl_ptr + row)
    o = tl.load(po_ptr + row[:, None] * BD + offs_d[None, :])  # (SPLITS, BD)
    m_all = tl.max(m, 0)
    if SINK:
        sk = tl.load(sink_ptr + h).to(tl.float32)
        m_all = tl.maximum(m_all, sk)
    w = tl.exp(m - m_all)  # 0 for a split with every key masked (m = -inf)
    den = tl.sum(l * w, 0)
    if SINK:
        den += tl.exp(sk - m_all)
    out = tl.sum(o * w[:, None], 0) / den
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _lanes(q_ptr, k_ptr, v_ptr, o_ptr, slot_ptr, start_ptr, sink_ptr, H, G, S, C, D, window, scale, cap,
           sqt, sqh, skb, skh, sks, svb, svh, svs, sot, soh, BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
           BD: tl.constexpr, WIN: tl.constexpr, CAP: tl.constexpr, SINK: tl.constexpr, IEEE: tl.constexpr):
    Hkv = H // G
    pid, mb = tl.program_id(0), tl.program_id(1)
    lane, hk = pid // Hkv, pid % Hkv
    r = tl.arange(0, BM * BG)  # query rows: BM tokens x BG heads of kv head hk
    c, g = mb * BM + r // BG, r % BG
    rmask = (c < C) & (g < G)
    heads = hk * G + g
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    tok = (lane * C + c).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sqt + heads[:, None] * sqh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BM * BG, BD)
    slot = tl.load(slot_ptr + lane).to(tl.int64)
    st = tl.load(start_ptr + lane).to(tl.int32)
    pos = st + c  # (rows,) each query's position
    kb = k_ptr + slot * skb + hk.to(tl.int64) * skh
    vb = v_ptr + slot * svb + hk.to(tl.int64) * svh
    hi = tl.minimum(S, st + mb * BM + BM)  # no key past the block's last position is seen
    lo = 0
    if WIN:
        lo = tl.maximum(0, st + mb * BM - window + 1) // BN * BN
    m_i = tl.full((BM * BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM * BG,), tl.float32)
    acc = tl.zeros((BM * BG, BD), tl.float32)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < S
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kb + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        s = _scores(q, k, scale, cap, CAP, IEEE)
        ok = nmask[None, :] & (offs_n[None, :] <= pos[:, None])
        if WIN:
            ok = ok & (pos[:, None] - offs_n[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = _online(s, vb + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :], kv_mask, m_i, l_i,
                                acc, IEEE)
    if SINK:
        l_i, acc = _sink(tl.load(sink_ptr + heads, mask=rmask, other=0.0).to(tl.float32), m_i, l_i, acc)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a padding token past every key: 0, not NaN
    tl.store(o_ptr + tok[:, None] * sot + heads[:, None] * soh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 / H200); 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def splits(B: int, Hkv: int, S: int, BN: int, programs: int = 256) -> int:
    """Splits of the cache per (row, kv head): a power of two, enough for about `programs` programs,
    each with at least one block of BN keys.

    Example:
        >>> splits(1, 4, 512, 64), splits(32, 4, 512, 64), splits(64, 8, 4096, 64)
        (8, 2, 1)
    """
    n = 1
    while B * Hkv * n < programs and n * 2 * BN <= S:
        n *= 2
    return n


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None = None, sinks: torch.Tensor | None = None, BN: int | None = None,
           n_splits: int | None = None) -> torch.Tensor:
    """Attention of q (B, H, 1, hd) over the cache k, v (B, H_kv, S, hd) with `mask` (B|1, 1, 1, S)
    (bool, or additive): (B, H, 1, hd) in q's dtype, what `layers.attend` computes. `BN` and
    `n_splits` override the key block and the splits (the tests use small ones)."""
    B, H, L, D = q.shape
    _, Hkv, S, _ = k.shape
    assert L == 1 and H % Hkv == 0 and k.stride(3) == 1 and v.stride(3) == 1, (q.shape, k.shape, k.stride())
    q = q if q.stride(3) == 1 else q.contiguous()
    G = H // Hkv
    BD = max(16, triton.next_power_of_2(D))  # tl.dot needs 16
    BN = BN or (64 if BD * q.element_size() <= 256 else 32)  # two stages of key and value tiles: <= 128 KB
    mask = mask.reshape(mask.shape[0], S).contiguous()
    smb = mask.stride(0) if mask.shape[0] > 1 else 0
    n = n_splits or splits(B, Hkv, S, BN)
    assert n & (n - 1) == 0, n  # the combine kernel's arange
    chunk = triton.cdiv(triton.cdiv(S, n), BN) * BN
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    if n == 1:
        pm = pl = po = out  # unused
    else:
        pm = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        po = torch.empty(B, H, n, BD, dtype=torch.float32, device=q.device)
    sink = sinks if sinks is not None else out  # unused pointer without sinks
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():  # Triton launches on the current device
        _partial[(B * Hkv, n)](
            q, k, v, mask, out, pm, pl, po, sink, H, G, S, D, chunk, float(scale), float(softcap or 1.0),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            smb, out.stride(0), out.stride(1), SPLITS=n, BG=max(16, triton.next_power_of_2(G)), BN=BN, BD=BD,
            CAP=softcap is not None, BOOL=mask.dtype == torch.bool, SINK=sinks is not None, FINAL=n == 1,
            IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
        if n > 1:
            _combine[(B * H,)](pm, pl, po, out, sink, H, D, out.stride(0), out.stride(1), SPLITS=n, BD=BD,
                               SINK=sinks is not None, num_warps=1 if BD <= 128 else 2)
    return out


@torch.library.custom_op("mlx_bridge::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """`decode` as one op (opaque to torch.compile; its kernels are captured in the step's CUDA graph)."""
    return decode(q, k, v, mask, scale, softcap, sinks)


@decode_attention.register_fake
def _(q, k, v, mask, scale, softcap, sinks):
    return q.new_empty(q.shape)


def lanes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, start: torch.Tensor, S: int,
          scale: float, window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
          BM: int | None = None, BN: int | None = None) -> torch.Tensor:
    """Attention of N lanes of C prompt tokens, q (N * C, H, 1, hd) lane-major, over the pool's cache
    rows k, v (R, H_kv, >= S, hd): lane i's token j sits at position start[i] + j of row slot[i] and
    sees that row's keys at positions <= its own (and within `window`), below S. Returns
    (N * C, H, 1, hd) in q's dtype: what `layers.attend` gives over the row's first S keys with the
    causal mask. `BM`, `BN` override the blocks (the tests use small ones)."""
    T, H, L, D = q.shape
    _, Hkv, Sk, _ = k.shape
    N = slot.shape[0]
    assert L == 1 and T % N == 0 and H % Hkv == 0 and S <= Sk and k.stride(3) == 1 and v.stride(3) == 1, (q.shape, k.shape)
    q = q if q.stride(3) == 1 else q.contiguous()
    slot, start = slot.contiguous(), start.contiguous()  # columns of the lanes' buffer in a mixed step
    G, C = H // Hkv, T // N
    BG = triton.next_power_of_2(G)
    BD = max(16, triton.next_power_of_2(D))
    if BM is None:  # 64 query rows a program, fewer (down to the 16 tl.dot needs) while that leaves an SM idle
        BM = max(1, 64 // BG)
        while BM * BG > 16 and N * Hkv * triton.cdiv(C, BM) < 2 * _sms(q.device):
            BM //= 2
    BM = max(BM, triton.cdiv(16, BG))
    BN = BN or (64 if BD * q.element_size() <= 256 else 32)
    out = torch.empty(T, H, 1, D, dtype=q.dtype, device=q.device)
    sink = sinks if sinks is not None else out
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        _lanes[(N * Hkv, triton.cdiv(C, BM))](
            q, k, v, out, slot, start, sink, H, G, S, C, D, int(window or 0), float(scale), float(softcap or 1.0),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), BM=BM, BG=BG, BN=BN, BD=BD, WIN=window is not None,
            CAP=softcap is not None, SINK=sinks is not None, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out


@torch.library.custom_op("mlx_bridge::lane_attention", mutates_args=())
def lane_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, start: torch.Tensor,
                   S: int, scale: float, window: int | None, softcap: float | None,
                   sinks: torch.Tensor | None) -> torch.Tensor:
    """`lanes` as one op (captured in the mixed step's CUDA graph)."""
    return lanes(q, k, v, slot, start, S, scale, window, softcap, sinks)


@lane_attention.register_fake
def _(q, k, v, slot, start, S, scale, window, softcap, sinks):
    return q.new_empty(q.shape)
