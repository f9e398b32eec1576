"""Issue 2, every other registered architecture, and configs whose meaning differs between mlx-lm and
transformers (sliding windows). Probes are 40-48 tokens long, past the 16-token windows used here."""

from __future__ import annotations

import pytest

from mlx_bridge.testing.adapters import probe_ids
from test_export_common import (assert_close, check_copied, exported, hf_config, load_hf, read_tensors, torch_logits,
                                zoo)  # noqa: F401

MORE = ["cohere", "ernie4_5", "exaone4", "gemma", "granite", "helium", "hunyuan_v1_dense", "internlm3", "nemotron",
        "olmo2", "olmo3", "olmoe", "seed_oss", "stablelm", "starcoder2"]


def long_ids(base, length=40):
    return probe_ids(hf_config(base)["vocab_size"], n=1, length=length, seed=3)


@pytest.mark.parametrize("arch", MORE)
def test_more_archs_plain_and_lora(zoo, arch):
    base = zoo.mlx(arch)
    ids = long_ids(base)
    out = exported(base)
    assert check_copied(out, base) == set(read_tensors(base))
    assert_close(torch_logits(load_hf(out), ids), zoo.logits(base, ids=ids), what=f"{arch} plain")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    assert_close(torch_logits(load_hf(exported(ad)), ids), zoo.logits(base, ad, ids=ids), what=f"{arch} lora")


# mlx-lm 0.32.2 attends to every position in these models whatever the config's sliding window says
# (mistral and mixtral are remapped to llama-style attention too); transformers applies the window.
SLIDING = {
    "mistral": dict(sliding_window=16),
    "mixtral": dict(sliding_window=16),
    "phi3": dict(sliding_window=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
}


@pytest.mark.parametrize("arch", list(SLIDING))
def test_sliding_window_config_as_mlx_computed(zoo, arch):
    base = zoo.mlx(arch, **SLIDING[arch])
    ids = long_ids(base, 48)
    assert_close(torch_logits(load_hf(exported(base)), ids), zoo.logits(base, ids=ids), what=f"{arch} window 16, 48 tokens")
