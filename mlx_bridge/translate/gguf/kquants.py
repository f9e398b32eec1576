"""Q4_K, Q5_K and Q6_K in numpy, byte for byte as llama.cpp's reference quantizer writes them.

A transcription of ggml-quants.c (`quantize_row_q{4,5,6}_K_ref`, `make_qkx2_quants`, `make_qx_quants`)
that `llama_model_quantize` runs when no importance matrix is given, vectorised over blocks. Every
step computes in float32 in the C order of operations: sub-blocks are columns of an (n, M) array, so
the sums C accumulates element by element are `np.add.reduce` over axis 0 (row after row, unlike the
pairwise sum numpy uses along a contiguous axis), and `nearest_int` is `np.rint` (round half to even,
as the C float trick). The scale searches keep, per sub-block, the scale (and min) of the best step
and recompute its quants once at the end, so each step is a few in-place passes over preallocated
buffers. The gguf package has Q8_0 / Q4_0 / ... but no K-quant writer.

Example:
    >>> import numpy as np
    >>> q = quantize_q4_k(np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256))
    >>> q.shape, q.dtype
    ((2, 144), dtype('uint8'))
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32
ZERO, ONE = F32(0), F32(1)
# bytes per 256-element block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (the n values of each sub-block) in index order, in float32, as a C loop does."""
    return np.add.reduce(a, axis=0)


def _nearest(v: np.ndarray) -> np.ndarray:
    """nearest_int, kept in float32 (round half to even; every result is an exact small integer)."""
    return np.rint(v, out=v)


def _quants(out: np.ndarray, x: np.ndarray, iscale: np.ndarray, lo: np.float32, hi: np.float32,
            base: np.ndarray | None = None) -> np.ndarray:
    """out = clamp(nearest_int(iscale * (x - base)), lo, hi), in place (iscale, base: one per column)."""
    if base is None:
        np.multiply(x, iscale, out=out)
    else:
        np.subtract(x, base, out=out)
        out *= iscale
    return np.clip(_nearest(out), lo, hi, out=out)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, -min, L) per column of x (n, M): asymmetric n-level fit searched over `nstep` scales.

    Columns are sub-blocks (transposed, so each of the n values is a contiguous row and sums run in C order).
    """
    mn0 = mn = np.minimum(x.min(axis=0), ZERO)
    mx = x.max(axis=0)
    flat = mx == mn
    fmax = F32(nmax)
    t, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)  # quants, w*l, scratch
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(np.multiply(w, x, out=tmp))
    # C overwrites `min` with each better fit, and later steps quantize x - min over (max - min) with it
    iscale = fmax / np.where(flat, ONE, mx - mn)
    scale = ONE / iscale
    best = _seq_sum(_error(t, _quants(t, x, iscale, ZERO, fmax, mn), scale, mn, x, w))
    best_is, best_base = iscale, mn  # the best L is recomputed from the iscale and min it was made with
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / np.where(flat, ONE, mx - mn)
        la = _quants(t, x, iscale, ZERO, fmax, mn)
        np.multiply(w, la, out=wl)
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(np.multiply(wl, la, out=tmp))
        sum_xl = _seq_sum(np.multiply(wl, x, out=tmp))
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, ONE)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min[pos] = ZERO
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = _seq_sum(_error(la, la, this_scale, this_min, x, w))
        better = ok & (cur < best)
        best_is = np.where(better, iscale, best_is)
        best_base = np.where(better, mn, best_base)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = _quants(t, x, best_is, ZERO, fmax, best_base)
    L[:, flat] = ZERO
    scale = np.where(flat, ZERO, scale)
    return scale.astype(F32), (-np.where(flat, mn0, mn)).astype(F32), L


def _error(out: np.ndarray, L: np.ndarray, scale: np.ndarray, mn: np.ndarray, x: np.ndarray,
           w: np.ndarray) -> np.ndarray:
    """out = w * (scale * L + min - x)^2 elementwise, in place (out may be L)."""
    np.multiply(L, scale, out=out)
    out += mn
    out -= x
    out *= out
    out *= w
    return out


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, L) per column of x (n, M): symmetric fit, rmse_type 1 (weights x²), no importance matrix."""
    ax = np.abs(x)
    amax = ax.max(axis=0)
    mx = x[-1]
    for i in range(x.shape[0] - 2, -1, -1):  # the first x of the largest |x| (argmax over axis 0 is slow)
        mx = np.where(ax[i] == amax, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, ONE, mx)
    w = np.multiply(x, x, out=ax)
    wx = w * x
    fmax = F32(nmax)
    lo, hi = -fmax, fmax - ONE
    t, tmp = np.empty_like(x), np.empty_like(x)

    def fit(iscale):
        l = _quants(t, x, iscale, lo, hi)
        sumlx = _seq_sum(np.multiply(wx, l, out=tmp))
        np.multiply(w, l, out=tmp)
        return sumlx, _seq_sum(np.multiply(tmp, l, out=tmp))

    best_is = -fmax / mx  # the best L is recomputed from the iscale it was made with
    sumlx, suml2 = fit(best_is)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, ZERO).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + F32(0.1) * F32(step)) / mx
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = sumlx / suml2
        best_is = np.where(better, iscale, best_is)
        scale = np.where(better, s, scale)
        best = np.where(better, scale * sumlx, best)
    L = _quants(t, x, best_is, lo, hi)
    L += fmax
    L[:, zero] = ZERO
    return np.where(zero, ZERO, scale).astype(F32), L


def _k_scales(scales: np.ndarray, mins: np.ndarray):
    """6-bit scales/mins of 8 sub-blocks packed in 12 bytes, and the fp16 d / dmin."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_m = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest(inv_s[:, None] * scales).astype(np.int32) & 0xFF, 63).astype(np.uint8)  # uint8_t = nearest_int
    lm = np.minimum(_nearest(inv_m[:, None] * mins).astype(np.int32) & 0xFF, 63).astype(np.uint8)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    return d, dmin, packed, ls, lm


CHUNK = 1024  # super-blocks per step: a few MB of working arrays, in the L2/L3 caches


def _chunked(f, x: np.ndarray) -> np.ndarray:
    """f over row chunks of the blocks (nb, 256), concatenated."""
    return np.concatenate([f(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)]) if len(x) else f(x)


def _quantize_qkx(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared body of Q4_K / Q5_K: (d, dmin, packed scales, L (nb, 256))."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, sub-blocks)
    sum_x2 = _seq_sum(sub * sub)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep)
    d, dmin, packed, ls, lm = _k_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    dd = d.astype(F32)[:, None] * ls.astype(F32)  # (nb, 8)
    dm = dmin.astype(F32)[:, None] * lm.astype(F32)
    safe = np.where(dd == 0, F32(1), dd)
    q = np.clip(_nearest((x.reshape(nb, 8, 32) + dm[..., None]) / safe[..., None]), 0, F32(nmax))
    return d, dmin, packed, _keep_where_zero(q, L, dd).reshape(nb, QK_K).astype(np.uint8)


def _keep_where_zero(q: np.ndarray, L: np.ndarray, dd: np.ndarray) -> np.ndarray:
    """q (nb, sub-blocks, n) with the sub-blocks whose scale dd is 0 taken from the search's L (n, nb·sub-blocks):
    C skips them (`if (!d) continue;`). They are rare, so only they are copied out of the transposed L."""
    zero = (dd == 0).reshape(-1)
    if zero.any():
        q.reshape(zero.size, -1)[zero] = L.T[zero]
    return q


def _blocks(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.ascontiguousarray(x, dtype=F32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {QK_K}")
    return x.reshape(-1, QK_K), x.shape


def _pack(parts: list[np.ndarray], block: int) -> np.ndarray:
    """The fields of each block side by side: (nb, block bytes)."""
    raw = np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(p.shape[0], -1) for p in parts], axis=1)
    assert raw.shape[1] == block
    return raw


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 (..., k·256) -> Q4_K bytes (..., k·144): d, dmin, scales[12], qs[128] per block."""
    xb, shape = _blocks(x)
    return _chunked(_q4_k, xb).reshape(*shape[:-1], shape[-1] // QK_K * BLOCK_BYTES["Q4_K"])


def _q4_k(xb: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _quantize_qkx(xb, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return _pack([d[:, None], dmin[:, None], sc, qs], BLOCK_BYTES["Q4_K"])


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 (..., k·256) -> Q5_K bytes (..., k·176): d, dmin, scales[12], qh[32], qs[128] per block."""
    xb, shape = _blocks(x)
    return _chunked(_q5_k, xb).reshape(*shape[:-1], shape[-1] // QK_K * BLOCK_BYTES["Q5_K"])


def _q5_k(xb: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _quantize_qkx(xb, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    hi = (L >> 4) & 1  # bit 4 of each quant
    shift = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = ((hi[:, :, 0] << shift) | (hi[:, :, 1] << (shift + 1))).sum(axis=1, dtype=np.uint8)  # disjoint bits
    lo = L & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return _pack([d[:, None], dmin[:, None], sc, qh, qs], BLOCK_BYTES["Q5_K"])


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 (..., k·256) -> Q6_K bytes (..., k·210): ql[128], qh[64], scales[16] (int8), d per block."""
    xb, shape = _blocks(x)
    return _chunked(_q6_k, xb).reshape(*shape[:-1], shape[-1] // QK_K * BLOCK_BYTES["Q6_K"])


def _q6_k(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    scales, L = make_qx_quants(np.ascontiguousarray(xb.reshape(nb * 16, 16).T), 32)
    scales = scales.reshape(nb, 16)
    a = np.abs(scales)
    imax = a.argmax(axis=1)
    max_scale = np.take_along_axis(scales, imax[:, None], 1)[:, 0]
    zero = a.max(axis=1) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d = _fp16(F32(1) / iscale)
    sc = np.minimum(_nearest(iscale[:, None] * scales), F32(127)).astype(np.int8)
    dd = d.astype(F32)[:, None] * sc.astype(F32)
    safe = np.where(dd == 0, F32(1), dd)
    q = np.clip(_nearest(xb.reshape(nb, 16, 16) / safe[..., None]), F32(-32), F32(31)) + F32(32)
    L = _keep_where_zero(q, L, dd).reshape(nb, 2, 4, 32).astype(np.uint8)  # [half][quarter][l]
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    d = np.where(zero, np.float16(0), d)
    for arr in (ql, qh):
        arr[zero] = 0
    sc[zero] = 0
    return _pack([ql, qh, sc, d[:, None]], BLOCK_BYTES["Q6_K"])


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
