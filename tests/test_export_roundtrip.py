"""Issue 2, round trip: the HF export converted back with `mlx_lm.convert` gives the fused MLX weights, i.e.
what `mlx_lm.fuse --dequantize` writes from the same base and adapter, and mlx-lm computes the same logits
from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.testing import mlx_convert
from mlx_bridge.testing.adapters import mlx_fuse
from test_export_common import (adapter_targets, as_array, assert_close, exported, read_tensors,
                                zoo)  # noqa: F401

CASES = {  # adapter name -> (arch, quant, adapter kwargs)
    "lora": ("llama", None, dict(rank=4, num_layers=2)),
    "dora": ("qwen2", None, dict(fine_tune_type="dora", rank=4)),
    "qlora": ("qwen3_moe", dict(bits=4, group_size=32), dict(rank=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_converts_back_to_the_fused_mlx_model(zoo, case):
    arch, quant, kw = CASES[case]
    base = zoo.mlx(arch, quant=quant)
    ad = zoo.adapter(base, case, **kw)
    fused = Path(f"{ad}-mlxfused")
    if not fused.exists():
        mlx_fuse(base, ad, fused, dequantize=True)
    back = Path(f"{ad}-roundtrip")
    if not back.exists():
        mlx_convert(exported(ad), back, dtype="float32")
    want, got = read_tensors(fused), read_tensors(back)
    assert set(got) == set(want), f"only back: {sorted(set(got) - set(want))[:5]}, only fused: {sorted(set(want) - set(got))[:5]}"
    touched = adapter_targets(ad)
    for k in want:
        assert got[k][:2] == want[k][:2], f"{k}: {got[k][:2]} != {want[k][:2]}"
        if k in touched:  # same float32 math, another summation order
            assert_close(as_array(got[k]), as_array(want[k]), atol=1e-6, what=k)
        else:
            assert got[k][2] == want[k][2], f"{k}: bytes differ from mlx_lm.fuse --dequantize"
    assert_close(zoo.logits(back), zoo.logits(base, ad), what=f"{case}: mlx-lm on the round trip")
    assert np.abs(zoo.logits(back) - zoo.logits(base)).max() > 0.1, "the adapter has no effect: weak test"
