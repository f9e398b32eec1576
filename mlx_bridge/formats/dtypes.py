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
