"""`c += a @ b` in float32 in one BLAS call: cblas_sgemm with beta = 1, from the OpenBLAS numpy uses.

numpy's matmul has no beta, so `c += a @ b` costs three passes over c's size: BLAS zeroing its
output (beta = 0), the product, and numpy's add. The LoRA fuse (`lora.fuse_rows`) does this for
every weight it fuses; calling the same BLAS with beta = 1 accumulates the product straight into c
(one core, 128-row blocks of the fuse: 2.02 -> 1.88 ns an element at 2048 columns, 1.33 -> 1.12 at 5632).

The values are numpy's, bit for bit: the same library and the arguments numpy's matmul passes
(row-major; a transposed operand as a transpose flag), so the same kernel forms the same sums, and
alpha = beta = 1 adds each sum to c rounded once, as `c + (a @ b)` does. Where that could differ,
numpy is used instead:
- shapes numpy computes without gemm (a row, a column or an inner size of one);
- an inner size above `MAX_K`: OpenBLAS adds blocks of the inner dimension to c one at a time
  (at least 112 wide in every OpenBLAS kernel table), which would add c into the first block;
- two untransposed operands: OpenBLAS has a direct kernel for them taken only with beta = 0;
- factors that are not `safe_factors`: OpenBLAS's beta = 0 output starts at +0, so a sum that
  rounds to -0 turns +0 before numpy's add, where beta = 1 would add -0 to a -0.0 weight.

Where numpy's build does not name OpenBLAS (Accelerate, MKL, no BLAS), its library is not found in
this process, or the check on first use finds a difference from numpy, `available()` is False and the
fuse uses numpy's matmul and add (the same values, more passes).

Example:
    >>> import numpy as np
    >>> a, b = np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)
    >>> c = np.full((2, 2), 0.5, np.float32)
    >>> if not accumulate(a, b, c):
    ...     c += a @ b
    >>> c.tolist()
    [[3.5, 3.5], [3.5, 3.5]]
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
MIN_EXP = -51  # nonzero factors at least 2^-51: every partial sum is a multiple of 2^-148 (never rounds to -0)
MAX_K = 64  # inner sizes (LoRA ranks) accumulated in one block by every OpenBLAS kernel


@functools.cache
def _sgemm():
    """(cblas_sgemm, its integer type) of numpy's OpenBLAS, or None."""
    try:
        from threadpoolctl import threadpool_info

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (ImportError, KeyError, TypeError):  # pragma: no cover - a core dependency; numpy >= 1.26
        return None
    if "openblas" not in str(blas.get("name", "")).lower():  # numpy's matmul calls another BLAS
        return None
    libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas" and i.get("filepath")]
    if len(libs) > 1:  # another package's OpenBLAS too: the one numpy ships
        root = Path(np.__file__).resolve().parent.parent
        libs = [i for i in libs if root in Path(i["filepath"]).resolve().parents]
    if len(libs) != 1:
        return None
    try:
        lib = ctypes.CDLL(libs[0]["filepath"])
    except OSError:
        return None
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            gemm = getattr(lib, f"{prefix}cblas_sgemm{suffix}", None)
            config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
            if gemm is not None and config is not None:
                config.restype = ctypes.c_char_p
                int_t = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int32
                gemm.argtypes = [ctypes.c_int] * 3 + [int_t] * 3 + [ctypes.c_float, ctypes.c_void_p, int_t,  # enums, m n k
                                                                   ctypes.c_void_p, int_t, ctypes.c_float, ctypes.c_void_p, int_t]
                gemm.restype = None
                return gemm, int_t
    return None


def _operand(x: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) as numpy's matmul passes a 2-D float32 operand, or None."""
    rows, cols = x.shape
    s0, s1 = x.strides
    if s1 == 4 and s0 % 4 == 0 and s0 // 4 >= cols:
        return _NO_TRANS, s0 // 4
    if s0 == 4 and s1 % 4 == 0 and s1 // 4 >= rows:
        return _TRANS, s1 // 4
    return None


def _call(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> bool:
    (m, k), n = a.shape, b.shape[1]
    if m < 2 or n < 2 or not 2 <= k <= MAX_K or b.shape[0] != k or c.shape != (m, n):
        return False
    if not (a.dtype == b.dtype == c.dtype == np.float32) or not c.flags.c_contiguous:
        return False
    ta, tb = _operand(a), _operand(b)
    found = _sgemm()
    if ta is None or tb is None or found is None or ta[0] == tb[0] == _NO_TRANS:
        return False
    gemm, int_t = found
    if int_t is ctypes.c_int32 and max(m, n, k, ta[1], tb[1]) >= 2**31:
        return False
    gemm(_ROW_MAJOR, ta[0], tb[0], m, n, k, 1.0, a.ctypes.data, ta[1], b.ctypes.data, tb[1], 1.0, c.ctypes.data, n)
    return True


@functools.cache
def available() -> bool:
    """Whether `accumulate` runs (numpy's OpenBLAS found, and it gives numpy's values on a check)."""
    if _sgemm() is None:
        return False
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((40, 16)).astype(np.float32))  # lora's left factor is a transpose
    b = rng.standard_normal((16, 72)).astype(np.float32)
    a[::3] = 0  # zero rows onto -0.0: the sums' sign of zero
    b[:, ::5] = -np.abs(b[:, ::5])
    c = rng.standard_normal((40, 72)).astype(np.float32)
    c[::2, ::2] = -0.0
    for x, y in ((a, b), (np.ascontiguousarray(a), np.asfortranarray(b))):
        want, got = c + x @ y, c.copy()
        if not _call(x, y, got) or not np.array_equal(want.view(np.uint32), got.view(np.uint32)):
            return False
    return True


def safe_factors(*factors: np.ndarray) -> bool:
    """Whether every nonzero value of the factors is at least 2^MIN_EXP in magnitude (then no sum of their
    products rounds to -0, and `accumulate` equals numpy's matmul + add on every value of c)."""
    tiny = np.float32(2.0**MIN_EXP).view(np.uint32)
    for f in factors:  # |x| as bits, minus one: 0 wraps to the largest, so the least is the least nonzero's
        bits = np.bitwise_and(f.view(np.uint32), np.uint32(0x7FFFFFFF))
        bits -= np.uint32(1)
        if bits.size and bits.min() < tiny - 1:
            return False
    return True


def accumulate(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> bool:
    """c += a @ b in one cblas_sgemm (beta = 1), the values numpy's `c + a @ b` gives when
    `safe_factors(a, b)`; False (c unchanged) where it does not run: no OpenBLAS, or a shape or layout
    it leaves to numpy (see the module's docstring).

    Args:
        a: (m, k) float32, rows or columns contiguous.
        b: (k, n) float32, rows or columns contiguous.
        c: (m, n) float32, C-contiguous; updated in place.
    """
    return available() and _call(a, b, c)
