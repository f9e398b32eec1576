"""Issue 13, export speed: the LoRA fuse accumulates the product into the weight's float32 upcast with one
cblas_sgemm call (beta = 1, `translate.gemm`). Its values must be numpy's `w + left @ right` bit for
bit, on every input the fuse can see: the sign of zero, subnormals, overflow to Inf, NaN payloads, both
operand layouts, every shape; and where the one call could differ it must not run."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mlx_bridge.translate import gemm
from mlx_bridge.translate.lora import fuse_lora, fuse_rows, lora_factors

openblas = pytest.mark.skipif(not gemm._sgemm(), reason="numpy's BLAS is not an OpenBLAS loaded in this process")


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def awkward(rng, shape, scale=1.0) -> np.ndarray:
    """float32 values with +-0, subnormals, huge values, Inf and NaN payloads mixed in."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    specials = np.array([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, np.inf, -np.inf], np.float32)
    idx = rng.choice(flat.size, min(flat.size, 64), replace=False)
    flat[idx] = rng.choice(specials, idx.size)
    flat[idx[:4]] = np.array([0x7FC00001, 0xFFA00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    return x


@openblas
def test_the_check_on_first_use_passes_here():
    assert gemm.available()


@openblas
@pytest.mark.parametrize("m,k,n", [(2, 2, 2), (3, 16, 5), (128, 16, 2048), (128, 16, 5632), (37, 64, 300),
                                   (1000, 8, 96), (7, 3, 4096)])
@pytest.mark.parametrize("layout", ["left transposed", "right transposed", "both transposed"])
def test_accumulate_is_numpys_add_of_the_product_bit_for_bit(m, k, n, layout):
    rng = np.random.default_rng(m * n + k)
    a = (rng.standard_normal((m, k)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    a[::5] = 0  # zero rows: sums of +-0 products onto -0.0 weights
    b[:, ::3] = -np.abs(b[:, ::3])
    if layout != "right transposed":
        a = np.asfortranarray(a)
    if layout != "left transposed":
        b = np.asfortranarray(b)
    c = awkward(rng, (m, n))
    with np.errstate(invalid="ignore", over="ignore"):
        want = c + np.matmul(a, b)
    assert gemm.safe_factors(a, b)
    got = c.copy()
    assert gemm.accumulate(a, b, got)
    np.testing.assert_array_equal(bits(got), bits(want))


@openblas
@pytest.mark.parametrize("why", ["one row", "one column", "rank 1", "rank above MAX_K", "no operand transposed",
                                 "strided output"])
def test_accumulate_leaves_to_numpy_what_it_could_compute_otherwise(why):
    rng = np.random.default_rng(0)
    m, k, n = {"one row": (1, 8, 16), "one column": (16, 8, 1), "rank 1": (16, 1, 16),
               "rank above MAX_K": (16, gemm.MAX_K + 1, 16)}.get(why, (16, 8, 16))
    a = np.asfortranarray(rng.standard_normal((m, k)).astype(np.float32))
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    if why == "no operand transposed":
        a = np.ascontiguousarray(a)
    if why == "strided output":
        c = np.zeros((m, 2 * n), np.float32)[:, ::2]
    before = c.copy()
    assert not gemm.accumulate(a, b, c)
    np.testing.assert_array_equal(c, before)


def test_tiny_factors_are_not_safe():
    assert gemm.safe_factors(np.array([[0.0, -1e-15, 3.0]], np.float32))
    assert not gemm.safe_factors(np.array([[0.0, 1.0]], np.float32), np.array([[1e-16]], np.float32))
    assert not gemm.safe_factors(np.array([[1e-40]], np.float32))  # a subnormal


@pytest.mark.parametrize("rows", [1, 5, 128])
@pytest.mark.parametrize("out_dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_fuse_rows_rounds_numpys_sum_once(rows, out_dtype):
    """The fuse of a bf16 weight (with +-0, subnormals, Inf/NaN) in blocks: numpy's matmul + add, then one
    rounding by ml_dtypes / numpy; the same bits whichever way the block is summed."""
    rng = np.random.default_rng(rows)
    a = (rng.standard_normal((2048, 16)) * 0.01).astype(np.float32)
    b = (rng.standard_normal((16, 300)) * 0.01).astype(np.float32)
    left, right = lora_factors(a, b, 2.0)
    right = np.ascontiguousarray(right)
    with np.errstate(over="ignore", invalid="ignore"):
        w = awkward(rng, (300, 2048), 0.02).astype(ml_dtypes.bfloat16)
        want = (np.matmul(left, right) + w.astype(np.float32)).astype(out_dtype)
        for one_pass in (True, False):
            out = np.empty(w.shape, out_dtype)
            scratch = np.empty(2 * rows * w.shape[1], np.float32)
            for i in range(0, w.shape[0], rows):
                fuse_rows(w[i:i + rows], left[i:i + rows], right, out[i:i + rows], scratch, one_pass)
            np.testing.assert_array_equal(bits(out), bits(want))


def test_a_product_that_rounds_to_minus_zero_onto_minus_zero_is_numpys():
    """Factors of 2^-80: each product rounds to -0 (or +0). OpenBLAS's beta = 0 output turns a -0 sum into +0
    before numpy adds the weight, so -0.0 weights stay +0 there; the fuse must not take the one-call path."""
    w = np.full((128, 2048), -0.0, np.float32).astype(ml_dtypes.bfloat16)
    a = np.full((2048, 16), 2.0**-80, np.float32)
    b = np.full((16, 128), -(2.0**-80), np.float32)
    with np.errstate(under="ignore"):
        want = (np.matmul(*lora_factors(a, b, 1.0)) + w.astype(np.float32)).astype(ml_dtypes.bfloat16)
        got = fuse_lora(w, a, b, 1.0, out_dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bits(got), bits(want))
