"""Fuse mlx-lm adapters into dense weights, in float32, rounded once by the caller.

mlx-lm layouts (tuner/lora.py, tuner/dora.py):
    LoRALinear      y = W x + scale * (x @ a) @ b      a (in, r), b (r, out)  ->  W + scale * (a @ b)^T
    LoRAEmbedding   E[t] + scale * a[t] @ b             a (vocab, r), b (r, dim) -> E + scale * a @ b
    LoRASwitchLinear (one expert e)                     a[e] (r, in), b[e] (out, r) -> W_e + scale * b[e] @ a[e]
    DoRALinear      (m / ||W + scale (a b)^T||_row) * (W + scale (a b)^T)

Example:
    >>> import numpy as np
    >>> W = np.zeros((3, 2), np.float32); a = np.ones((2, 1), np.float32); b = np.ones((1, 3), np.float32)
    >>> fuse_lora(W, a, b, 2.0).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

import numpy as np

from . import gemm


def lora_factors(a: np.ndarray, b: np.ndarray, scale: float, kind: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """(left, right), float32, with delta = left @ right the dense update (same shape as the weight)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    if kind == "linear":
        return scale * b.T, a.T  # (out, r) @ (r, in)
    if kind == "embedding":
        return scale * a, b  # (vocab, r) @ (r, dim)
    if kind == "switch":
        return scale * b, a  # (out, r) @ (r, in)
    raise ValueError(kind)


def fuse_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, kind: str = "linear",
              out_dtype=np.float32, rows: int = 128) -> np.ndarray:
    """W + delta computed in float32 and rounded once to `out_dtype`.

    Done in blocks of `rows` rows (`fuse_rows`), so the float32 temporaries stay in the CPU cache
    (about twice as fast as whole-matrix passes, and no full-size float32 copy unless out_dtype is
    float32).
    """
    left, right = lora_factors(a, b, scale, kind)
    right = np.ascontiguousarray(right)
    one_pass = gemm.safe_factors(left, right)
    out = np.empty(w.shape, out_dtype)
    scratch = np.empty(2 * min(rows, w.shape[0]) * w.shape[1], np.float32)
    for i in range(0, w.shape[0], rows):
        j = min(i + rows, w.shape[0])
        fuse_rows(w[i:j], left[i:j], right, out[i:j], scratch, one_pass)
    return out


def fuse_rows(w: np.ndarray, left: np.ndarray, right: np.ndarray, out: np.ndarray, scratch: np.ndarray,
              one_pass: bool = False) -> None:
    """out = round(left @ right + w) for one block of rows of a weight, in float32 (exact upcast of w;
    `scratch`: at least 2 * w.size float32, reused). `one_pass`: the factors are `gemm.safe_factors`,
    so the product may be accumulated into the upcast by BLAS (`gemm.accumulate`: the same values).

    Example:
        >>> out = np.empty((2, 2), np.float32)
        >>> fuse_rows(np.ones((2, 2), np.float32), np.ones((2, 1), np.float32), np.ones((1, 2), np.float32), out,
        ...           np.empty(8, np.float32))
        >>> out.tolist()
        [[2.0, 2.0], [2.0, 2.0]]
    """
    up = scratch[: w.size].reshape(w.shape)
    np.copyto(up, w, casting="unsafe")  # exact upcast; a mixed-dtype add would be much slower
    if one_pass and gemm.accumulate(left, right, up):
        t = up
    else:
        t = scratch[w.size: 2 * w.size].reshape(w.shape)
        np.matmul(left, right, out=t)
        t += up
    with np.errstate(over="ignore"):  # an overflow to Inf is refused by the NaN/Inf scan, by name
        out[...] = t


def fuse_dora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, m: np.ndarray) -> np.ndarray:
    """DoRA: rows of the adapted weight rescaled to the learned magnitude m, float32."""
    adapted = fuse_lora(w, a, b, scale, "linear")  # float32
    norm = np.linalg.norm(adapted, axis=1)
    return (m.astype(np.float32) / norm)[:, None] * adapted
