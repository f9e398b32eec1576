"""Issue 2, dtypes: `--dtype auto` keeps the base's dtype and copies untouched tensors byte for byte (bf16
too); fused weights are computed in float32 and rounded once; `--dtype X` casts with round-to-nearest-even."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mlx_bridge.formats import DTYPES, load_file
from test_export_common import (adapter_targets, as_array, assert_close, check_copied, exported, hf_config, ids_for,
                                load_hf, read_tensors, torch_logits, zoo)  # noqa: F401

QV_LAST = dict(keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1, rank=2)


def fused_reference(base, ad, name: str) -> np.ndarray:
    """W + scale·(A·B)ᵀ in float32 (numpy), from the MLX base and the adapter files."""
    import json

    scale = json.loads((ad / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    a = load_file(ad / "adapters.safetensors")
    mod = name.removesuffix(".weight")
    w = as_array(read_tensors(base)[name]).astype(np.float32)
    return w + scale * (a[f"{mod}.lora_a"] @ a[f"{mod}.lora_b"]).T


def ulps_bf16(x: np.ndarray, y: np.ndarray) -> int:
    xi = x.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int32)
    yi = y.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int32)
    return int(np.abs(xi - yi).max())


def test_bf16_base_untouched_tensors_are_source_bytes(zoo):
    base = zoo.mlx("llama", dtype="bfloat16")
    ad = zoo.adapter(base, "lora-qv-last", **QV_LAST)
    out = exported(ad)
    assert hf_config(out).get("dtype", hf_config(out).get("torch_dtype")) == "bfloat16"
    targets = adapter_targets(ad)
    check_copied(out, base, touched=targets)
    dst = read_tensors(out)
    assert {t[0] for t in dst.values()} == {"BF16"}
    for name in targets:  # rounded once from float32; a summation order may move the last bit
        want = fused_reference(base, ad, name).astype(ml_dtypes.bfloat16)
        assert ulps_bf16(as_array(dst[name]), want) <= 1, name
    # transformers in float32 on the bf16 weights vs MLX computing in bf16: same function up to bf16 noise
    got, want = torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad)
    assert_close(got, want, atol=0.05 * float(np.abs(want).max()), what="bf16 llama lora (bf16 compute noise)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_float32_base(zoo, dtype):
    """--dtype X on a float32 base: every tensor is the source rounded to nearest even."""
    base = zoo.mlx("llama")
    out = exported(base, dtype=dtype)
    assert hf_config(out).get("dtype", hf_config(out).get("torch_dtype")) == dtype
    src, dst = read_tensors(base), read_tensors(out)
    assert set(src) == set(dst)
    npd = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    for k, t in src.items():
        assert DTYPES[dst[k][0]].np == np.dtype(npd), f"{k}: {dst[k][0]}"
        assert dst[k][2] == as_array(t).astype(npd).tobytes(), f"{k}: not the RNE cast of the source"


def test_lora_fused_then_rounded_once_to_bf16(zoo):
    """float32 base + LoRA exported as bf16: bf16(W + delta), not bf16(W) + bf16(delta)."""
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-qv-last", **QV_LAST)
    out = exported(ad, dtype="bfloat16")
    dst = read_tensors(out)
    for name in adapter_targets(ad):
        ref = fused_reference(base, ad, name)
        got, once = as_array(dst[name]), ref.astype(ml_dtypes.bfloat16)
        w = as_array(read_tensors(base)[name])
        delta = ref - w  # what the adapter adds, in float32
        twice = (w.astype(ml_dtypes.bfloat16).astype(np.float32) + delta.astype(ml_dtypes.bfloat16).astype(np.float32))
        twice = twice.astype(ml_dtypes.bfloat16)
        assert (twice != once).mean() > 0.05, "test cannot tell one rounding from two here"
        assert ulps_bf16(got, ref) <= 1 and (got != once).mean() < 0.01, \
            f"{name}: {(got != once).mean():.1%} differ from bf16(W + delta); bf16(W) + bf16(delta) differs by {(twice != once).mean():.1%}"


def test_bf16_upcast_to_float32_is_exact(zoo):
    base = zoo.mlx("llama", dtype="bfloat16")
    out = exported(base, dtype="float32")
    src, dst = read_tensors(base), read_tensors(out)
    for k, t in src.items():
        assert dst[k][0] == "F32" and dst[k][2] == as_array(t).astype(np.float32).tobytes(), k
