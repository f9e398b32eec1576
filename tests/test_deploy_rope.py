"""Rope variants and attention layouts of the native classes, against transformers on tiny models."""

from __future__ import annotations

import pytest
import torch

from mlx_bridge.deploy.native.config import ModelArgs
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.native.rope import inv_freq
from mlx_bridge.errors import BridgeError
from mlx_bridge.testing.models import tiny_hf_model

ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", ROPES)
def test_inv_freq_equals_transformers(name):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                               rope_parameters=dict(ROPES[name]))
    ref, ref_scale = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    got, scale = inv_freq(ModelArgs.from_hf(cfg).ropes[0])
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)
    assert scale == pytest.approx(ref_scale)


def _logits_match(d, L=48, atol=1e-5):
    from transformers import AutoModelForCausalLM

    m = load(d, backend="native")
    ids = torch.randint(0, m.config["vocab_size"], (2, L), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (m.logits(ids) - ref(ids).logits).abs().max().item()
    assert diff <= atol, f"{d.name}: max |diff| {diff:.3g}"
    return m


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_llama_with_scaled_rope(tmp_path, name):
    _logits_match(tiny_hf_model(tmp_path / name, "llama", rope_parameters=dict(ROPES[name])))


@pytest.mark.parametrize("arch,overrides", [
    ("phi3", {"partial_rotary_factor": 0.5}),  # rotates half of each head
    ("mistral", {"sliding_window": 8}),  # one window for every layer
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # layer 1 slides
    ("gemma3_text", {"sliding_window": 8, "rope_parameters": {  # local/global rope bases, scaled global
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [0]}),  # a dense layer, unnormalised routing
])
def test_layouts(tmp_path, arch, overrides):
    m = _logits_match(tiny_hf_model(tmp_path / arch, arch, **overrides))
    assert m.backend == "native"


def test_unsupported_rope_runs_through_transformers(tmp_path):
    d = tiny_hf_model(tmp_path / "dyn", "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                 "rope_theta": 10000.0})
    with pytest.raises(BridgeError, match="rope_type 'dynamic'"):
        load(d, backend="native")
    with pytest.warns(UserWarning, match="dynamic"):
        m = load(d)
    assert m.backend == "transformers"
    assert m.generate("give three tips", max_tokens=4) == load(d, backend="transformers").generate(
        "give three tips", max_tokens=4)
