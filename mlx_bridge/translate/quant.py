"""Exact dequantization of MLX quantized weights, in numpy.

MLX stores a quantized matrix W (..., out, in) as `weight` uint32 (..., out, in*bits/32): a little-endian
bitstream per row, element i in bits [i*bits, (i+1)*bits); plus per-group `scales` (and `biases` in
affine mode) of shape (..., out, in/group_size). `mx.dequantize` computes

    affine:  w = scales * q + biases   in the scales' dtype, rounding after each op
    mxfp4:   w = e2m1(q) * 2**(scales - 127)        (scales uint8 E8M0, group 32)
    mxfp8:   w = e4m3(q) * 2**(scales - 127)        (scales uint8 E8M0, group 32)
    nvfp4:   w = e2m1(q) * e4m3(scales)             (scales uint8 E4M3, group 16)

and so does `dequantize` here, bit for bit (the tests compare against `mx.dequantize`).

Example:
    >>> import numpy as np
    >>> q = np.array([[0x76543210, 0xFEDCBA98]], dtype=np.uint32)      # 16 4-bit values 0..15
    >>> s, b = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    >>> dequantize(q, s, b, bits=4, group_size=16).tolist()[0][:4]
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..errors import BridgeError

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128)
# mode -> (bits, group_size, element decoder name)
MX_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine",) + tuple(MX_MODES)

# E2M1 code -> value (sign bit 3)
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint32 rows (..., n*bits/32) into uint8 codes (..., n) (little-endian bitstream)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint32)
    lead, words = packed.shape[:-1], packed.shape[-1]
    n = words * 32 // bits
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: fixed positions inside each word
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)
        codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        return codes.reshape(*lead, n).astype(np.uint8)
    # 3, 5, 6 bits: values straddle words; go through the bitstream
    bitstream = np.unpackbits(packed.view(np.uint8).reshape(*lead, words * 4), axis=-1, bitorder="little")
    bitstream = bitstream.reshape(*lead, n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (bitstream.astype(np.uint16) * weights).sum(-1, dtype=np.uint16).astype(np.uint8)


def _round_op(x32: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round a float32 result to `dtype` (what one MLX op in that dtype does)."""
    return x32.astype(dtype)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray | None, *, bits: int,
               group_size: int, mode: str = "affine", out_dtype: np.dtype | None = None) -> np.ndarray:
    """Dense weight (..., out, in) from MLX's quantized form, exactly as `mx.dequantize` computes it.

    Affine results are in the scales' dtype; mx modes in `out_dtype` (default bfloat16, mlx's default).
    """
    codes = unpack(packed, bits)  # (..., out, in)
    *lead, inner = codes.shape
    if inner % group_size:
        raise BridgeError(f"input size {inner} is not a multiple of group_size {group_size}")
    g = codes.reshape(*lead, inner // group_size, group_size)
    if mode == "affine":
        if biases is None:
            raise BridgeError("affine quantization needs biases")
        dt = scales.dtype
        s = scales.astype(np.float32)[..., None]
        b = biases.astype(np.float32)[..., None]
        if dt == np.float32:
            w = g.astype(np.float32) * s + b  # float32: no intermediate rounding to emulate
            w = w.astype(np.float32)
        else:  # scale * q rounded to dt, then + bias rounded to dt
            prod = _round_op(g.astype(np.float32) * s, dt).astype(np.float32)
            w = _round_op(prod + b, dt)
        return w.reshape(*lead, inner)
    if mode not in MX_MODES:
        raise BridgeError(f"quantization mode {mode!r} is not supported (supported: {', '.join(MODES)})")
    if mode in ("mxfp4", "nvfp4"):
        vals = _E2M1[g]
    else:  # mxfp8: E4M3 codes
        vals = g.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if mode == "nvfp4":
        sc = scales.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        sc = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    w = vals * sc[..., None]
    return w.reshape(*lead, inner).astype(out_dtype or ml_dtypes.bfloat16)


def dequantized_shape(packed_shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Logical (dense) shape of a packed weight."""
    return (*packed_shape[:-1], packed_shape[-1] * 32 // bits)
