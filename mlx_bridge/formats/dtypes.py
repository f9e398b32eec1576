"""One dtype table: safetensors name <-> bytes per element <-> numpy dtype <-> user-facing name.

bf16 and fp8 come from ml_dtypes, so no torch or mlx is needed to read or write them.

Example:
    >>> DTYPES["BF16"].itemsize, DTYPES["BF16"].name
    (2, 'bfloat16')
    >>> st_name("float16")
    'F16'
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    st: str  # safetensors name, e.g. "BF16"
    name: str  # torch-style name, e.g. "bfloat16" (what config.json's torch_dtype says)
    np: np.dtype
    itemsize: int
    floating: bool


def _d(st: str, name: str, npt, floating: bool) -> DType:
    npd = np.dtype(npt)
    return DType(st, name, npd, npd.itemsize, floating)


_TABLE = [
    _d("F64", "float64", np.float64, True),
    _d("F32", "float32", np.float32, True),
    _d("F16", "float16", np.float16, True),
    _d("BF16", "bfloat16", ml_dtypes.bfloat16, True),
    _d("F8_E4M3", "float8_e4m3fn", ml_dtypes.float8_e4m3fn, True),
    _d("F8_E5M2", "float8_e5m2", ml_dtypes.float8_e5m2, True),
    _d("I64", "int64", np.int64, False),
    _d("I32", "int32", np.int32, False),
    _d("I16", "int16", np.int16, False),
    _d("I8", "int8", np.int8, False),
    _d("U64", "uint64", np.uint64, False),
    _d("U32", "uint32", np.uint32, False),
    _d("U16", "uint16", np.uint16, False),
    _d("U8", "uint8", np.uint8, False),
    _d("BOOL", "bool", np.bool_, False),
]

DTYPES: dict[str, DType] = {d.st: d for d in _TABLE}
BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_NAME.update({"fp32": DTYPES["F32"], "fp16": DTYPES["F16"], "bf16": DTYPES["BF16"], "half": DTYPES["F16"], "float": DTYPES["F32"]})
_BY_NP: dict[np.dtype, DType] = {d.np: d for d in _TABLE}

# what `--dtype` accepts besides "auto"
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def st_name(name: str) -> str:
    """Safetensors dtype name for a user/torch name ("bfloat16" -> "BF16")."""
    return BY_NAME[name].st


def from_numpy(dt: np.dtype) -> DType:
    """Table entry for a numpy dtype (ml_dtypes included)."""
    return _BY_NP[np.dtype(dt)]


# (unsigned view, exponent mask): a value is NaN or Inf exactly when all its exponent bits are set
_SPECIAL = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00),
            "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C)}


def count_nonfinite(a: np.ndarray, chunk: int = 1 << 16) -> int:
    """Number of NaN/Inf values of a floating array (0 for other dtypes), from the exponent bits: an
    integer mask on an unsigned view (no float conversion), `chunk` elements at a time into one small
    scratch (cache-sized; no temporaries the size of `a`); counted only in a chunk that has one.

    The common case, none, is decided without a temporary: numpy's `isfinite` for its own types of 32
    bits and more, and for the narrower ones two max reductions of the bits (a value is NaN/Inf exactly
    when, sign aside, its bits are at least the exponent mask: as unsigned, a negative one is at least
    sign | mask; as signed, a positive one is at least mask), 2x faster than the masking.

    Example:
        >>> count_nonfinite(np.array([1.0, np.nan, np.inf, -np.inf], np.float32))
        3
        >>> count_nonfinite(np.array([1.0, np.nan], ml_dtypes.bfloat16))
        1
        >>> count_nonfinite(np.array([-1.0, -np.inf], ml_dtypes.bfloat16))
        1
    """
    d = from_numpy(a.dtype)
    if d.st == "F8_E4M3":  # no Inf; NaN is the one pattern s.1111.111
        u = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return int(np.count_nonzero((u & 0x7F) == 0x7F))
    if d.st not in _SPECIAL or a.size == 0:
        return 0
    ut, mask = _SPECIAL[d.st]
    u = np.ascontiguousarray(a).reshape(-1).view(ut)
    if d.itemsize >= 4:
        if all(np.isfinite(u[i:i + chunk].view(a.dtype)).all() for i in range(0, u.size, chunk)):
            return 0
    else:
        sign = 1 << (8 * d.itemsize - 1)
        if u.max() < sign | mask and u.view(f"i{d.itemsize}").max() < mask:
            return 0
    m = ut(mask)
    scratch = np.empty(min(chunk, u.size), ut)
    n = 0
    for i in range(0, u.size, chunk):
        x = u[i: i + chunk]
        t = scratch[: x.size]
        np.bitwise_and(x, m, out=t)
        if t.max() == m:  # all exponent bits set somewhere in this chunk
            n += int(np.count_nonzero(t == m))
    return n
