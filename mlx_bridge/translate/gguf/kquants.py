"""Q4_K, Q5_K and Q6_K in numpy, byte for byte as llama.cpp's reference quantizer writes them.

A transcription of ggml-quants.c (`quantize_row_q{4,5,6}_K_ref`, `make_qkx2_quants`, `make_qx_quants`)
that `llama_model_quantize` runs when no importance matrix is given, vectorised over blocks. Every
step computes in float32 in the C order of operations: sums that C accumulates element by element are
`np.add.accumulate` (sequential, unlike `np.sum`'s pairwise sum) and `nearest_int` is `np.rint` (round
half to even, as the C float trick). The gguf package has Q8_0 / Q4_0 / ... but no K-quant writer.

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
# bytes per 256-element block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (the n values of each sub-block) in index order, in float32, as a C loop does."""
    s = a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _nearest(v: np.ndarray) -> np.ndarray:
    """nearest_int, kept in float32 (round half to even; every result is an exact small integer)."""
    return np.rint(v, out=v)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, -min, L) per column of x (n, M): asymmetric n-level fit searched over `nstep` scales.

    Columns are sub-blocks (transposed, so each of the n values is a contiguous row and sums run in C order).
    """
    mn0 = mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn
    fmax = F32(nmax)
    one = F32(1)
    # C overwrites `min` with each better fit, and later steps quantize x - min over (max - min) with it
    iscale = fmax / np.where(flat, one, mx - mn)
    scale = one / iscale
    L = np.clip(_nearest(iscale * (x - mn)), 0, fmax)
    diff = (scale * L + mn) - x
    best = _seq_sum(w * (diff * diff))
    best_is, best_base = iscale, mn  # the best L is recomputed from the iscale and min it was made with
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / np.where(flat, one, mx - mn)
        la = np.clip(_nearest(iscale * (x - mn)), 0, fmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * la), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        diff = la
        diff *= this_scale
        diff += this_min
        diff -= x
        diff *= diff
        diff *= w
        cur = _seq_sum(diff)
        better = ok & (cur < best)
        best_is = np.where(better, iscale, best_is)
        best_base = np.where(better, mn, best_base)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.clip(_nearest(best_is * (x - best_base)), 0, fmax)
    L = np.where(flat, F32(0), L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-np.where(flat, mn0, mn)).astype(F32), L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, L) per column of x (n, M): symmetric fit, rmse_type 1 (weights x²), no importance matrix."""
    ax = np.abs(x)
    mx = np.take_along_axis(x, ax.argmax(axis=0)[None], 0)[0]  # first x of the largest |x|
    zero = ax.max(axis=0) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x
    fmax = F32(nmax)

    def fit(iscale):
        l = np.clip(_nearest(iscale * x), -fmax, fmax - 1)
        return l, _seq_sum(wx * l), _seq_sum(w * l * l)

    l, sumlx, suml2 = fit(-fmax / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    L = l
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + F32(0.1) * F32(step)) / mx
        l, sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = sumlx / suml2
        L = np.where(better, l, L)
        scale = np.where(better, s, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero, F32(0), L + fmax)
    return np.where(zero, F32(0), scale).astype(F32), L


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


CHUNK = 512  # super-blocks per step: the working arrays (32 x 4096 floats) stay in cache


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
    L = L.T
    d, dmin, packed, ls, lm = _k_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    dd = d.astype(F32)[:, None] * ls.astype(F32)  # (nb, 8)
    dm = dmin.astype(F32)[:, None] * lm.astype(F32)
    safe = np.where(dd == 0, F32(1), dd)
    q = np.clip(_nearest((x.reshape(nb, 8, 32) + dm[..., None]) / safe[..., None]), 0, F32(nmax))
    L = np.where((dd == 0)[..., None], L.reshape(nb, 8, 32), q).reshape(nb, QK_K)
    return d, dmin, packed, L.astype(np.uint8)


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
    L = L.T.reshape(nb, 16, 16)
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
    L = np.where((dd == 0)[..., None], L, q).reshape(nb, 2, 4, 32).astype(np.uint8)  # [half][quarter][l]
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    d = np.where(zero, np.float16(0), d)
    for arr in (ql, qh):
        arr[zero] = 0
    sc[zero] = 0
    return _pack([ql, qh, sc, d[:, None]], BLOCK_BYTES["Q6_K"])


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
