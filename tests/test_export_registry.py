"""Issue 10: every registered type the older parity files do not cover — a tiny random transformers model ->
mlx-lm convert -> (LoRA on every linear) -> export with the registry's derived rules -> transformers' logits
within 1e-3 relative of MLX's. The list comes from the registry, not from this file.

Types whose tensors mlx-lm drops (vision towers of multimodal checkpoints, an unused routing bias) are
exported with `hf_base=` the HF checkpoint, and the dropped tensors are checked to be its bytes (or zeros)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_bridge.archs import get_arch, supported, template
from mlx_bridge.testing.adapters import probe_ids
from test_export_archs import MORE
from test_export_common import ARCHS, as_array, assert_close, exported, hf_config, read_tensors, zoo  # noqa: F401

NEW = [t for t in supported() if t not in ARCHS + MORE]
RTOL = 1e-3


def close(got, want, what):
    assert_close(got, want, atol=RTOL * float(np.abs(want).max()), what=what)


def load(d, arch):
    """The type's own auto class, failing on any missing/unexpected/mismatched key."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if arch.hf_auto == "causal_lm" else AutoModelForImageTextToText
    model, info = auto.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: loading info not clean: {bad}"
    return model.eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    x = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():  # no cache: hybrid linear-attention caches cannot be built for a bare forward
        try:
            return model(x, use_cache=False).logits.float().numpy()
        except AttributeError:  # llama4's multimodal forward fails on text alone (transformers 5.24): its LM
            return model.language_model(x, use_cache=False).logits.float().numpy()


@pytest.mark.parametrize("model_type", NEW)
def test_registry_type_plain_and_lora(zoo, model_type):
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type)
    kw = {"hf_base": str(zoo.hf(model_type))} if arch.dropped else {}
    cfg = hf_config(base)
    ids = probe_ids((cfg.get("text_config") or cfg)["vocab_size"], n=1, length=24, seed=3)
    out = exported(base, **kw)
    close(torch_logits(load(out, arch), ids), zoo.logits(base, ids=ids), f"{model_type} plain")
    if arch.dropped:  # copied from the HF base byte for byte, or the zeros MLX computed with
        src, dst = read_tensors(zoo.hf(model_type)), read_tensors(out)
        for k, t in src.items():
            if template(k)[0] in arch.dropped:
                want = np.zeros_like(as_array(t)).tobytes() if template(k)[0] in arch.quirks.unused else t[2]
                assert dst[k][2] == want, f"{k}: not as in the HF base"
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad, **kw), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} lora")
