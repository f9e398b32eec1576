"""Native model classes == transformers (float32, rounding level) for every native arch; cache == recompute.

Random tiny models (2 layers, hidden 64, random norms) from `tiny_hf_model`; inputs longer than the
sliding windows (32) so window masks are exercised.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mlx_bridge.deploy.native.config import ModelArgs
from mlx_bridge.deploy.native.layers import KVCache
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.native.model import Transformer, decode_step, prefill
from mlx_bridge.testing.adapters import shared_zoo

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "qwen2_moe",
         "olmoe", "gpt_oss", "phimoe", "glm4_moe", "deepseek_v3", "glm4_moe_lite"]
# transformers' eager attention repeats deepseek_v3's expanded keys num_attention_heads / num_key_value_heads
# times (a shape error unless they are equal); its SDPA path and the latent attention ignore the field
HF_EAGER = {"deepseek_v3": {"num_key_value_heads": 4}, "glm4_moe_lite": {"num_key_value_heads": 4}}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
# glm4_moe with its routing in full: 8 experts in 2 groups (one kept), scaled; q/k norms, attention biases
GLM4_GROUPED = dict(num_local_experts=8, n_group=2, topk_group=1, routed_scaling_factor=2.5)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def hf_logits(d, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return m(ids).logits.float()


def ids_for(vocab, B=2, L=40, seed=0):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, atol, what=""):
    d = (a - b).abs()
    assert d.max().item() <= atol, f"{what}: max |diff| {d.max().item():.3g}, mean {d.mean().item():.3g} > {atol}"


@pytest.mark.parametrize("arch,over", [(a, HF_EAGER.get(a, {})) for a in ARCHS] + [
    ("glm4_moe", {**GLM4_GROUPED, "use_qk_norm": True, "attention_bias": True}),
    ("deepseek_v3", {**HF_EAGER["deepseek_v3"], **GLM4_GROUPED, "attention_bias": True}),
    ("deepseek_v3", {**HF_EAGER["deepseek_v3"], "q_lora_rank": None}),  # one q_proj
    ("deepseek_v3", {**HF_EAGER["deepseek_v3"], "rope_interleave": False, "rope_parameters": YARN}),  # mscale
    ("glm4_moe_lite", {**HF_EAGER["glm4_moe_lite"], **GLM4_GROUPED, "attention_bias": True})])
def test_native_equals_transformers(zoo, arch, over):
    d = zoo.hf(arch, **over)
    m = load(d, backend="native")
    assert m.backend == "native" and isinstance(m.module, Transformer)
    ids = ids_for(m.config["vocab_size"])
    assert_close(m.logits(ids), hf_logits(d, ids), 1e-5, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_hf_layout(zoo, arch):
    """The module's parameter names are exactly the tensors transformers saved (strict load)."""
    d = zoo.hf(arch)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    module = Transformer(ModelArgs.from_dict(json.loads((d / "config.json").read_text())))
    assert set(module.state_dict()) == set(saved)
    module.load_state_dict(saved, strict=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe", "glm4_moe"])
def test_bfloat16_close_to_transformers(zoo, arch):
    d = zoo.hf(arch)
    m = load(d, dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.module.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = ids_for(m.config["vocab_size"], L=24)
    ref, got = hf_logits(d, ids, torch.bfloat16), m.logits(ids)
    if arch in ("qwen3_moe", "glm4_moe"):  # rounding may flip a near-tie in the router: a few positions move a lot
        assert (got - ref).abs().mean().item() < 0.01 * ref.abs().max().item()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    else:
        assert_close(got, ref, 0.05 * ref.abs().max().item(), arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_decode_equals_full_recompute(zoo, arch):
    """Prefill + one-token decode steps over the static cache give the full pass's logits, with padding."""
    m = load(zoo.hf(arch))
    module, V = m.module, m.config["vocab_size"]
    ids = ids_for(V, B=2, L=40, seed=1)
    full = m.logits(ids)
    P = 5
    pad = torch.tensor([0, 2])  # row 1 is left-padded by 2: its tokens are ids[1, :-2]
    toks = ids.clone()
    toks[1] = torch.cat([torch.zeros(2, dtype=ids.dtype), ids[1, :-2]])
    cache = KVCache.allocate(module.args, 2, 40, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        got = [prefill(module, cache, toks[:, :P], pad)]
        for s in range(P, 40):
            got.append(decode_step(module, cache, toks[:, s:s + 1], torch.tensor([s]), pad))
    got = torch.stack(got, 1).float()  # [B, 40 - P + 1, V]: logits at positions P-1 .. 39
    assert_close(got[0], full[0, P - 1:], 2e-5, f"{arch} row 0")
    row1 = m.logits(ids[1:, :-2])[0]  # the padded row alone, unpadded
    assert_close(got[1], row1[P - 3:], 2e-5, f"{arch} padded row")


def test_module_casts_keep_rope_in_float32(zoo):
    """`.to(dtype)` on the plain nn.Module casts weights, never the rope frequencies."""
    m = load(zoo.hf("llama"))
    module = m.module
    ref = module.rope_inv_freq_0.clone()
    module.to(torch.bfloat16)
    assert module.model.norm.weight.dtype == torch.bfloat16
    assert module.rope_inv_freq_0.dtype == torch.float32 and torch.equal(module.rope_inv_freq_0, ref)
    ids = ids_for(m.config["vocab_size"], L=12)
    with torch.no_grad():
        cast = module(ids)
    assert torch.equal(cast.float(), load(zoo.hf("llama"), dtype="bfloat16").logits(ids))  # same as loading bf16


PHIMOE_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                   "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
                   "short_mscale": 1.1, "long_mscale": 1.3}


def test_phimoe_longrope_equals_transformers(tmp_path):
    """`PhimoeRotaryEmbedding`: short factors at every length, `short_mscale` up to the original context and
    `long_mscale` past it (for the whole pass, and per step when decoding across it)."""
    from transformers import AutoModelForCausalLM

    from mlx_bridge.testing.adapters import tiny_hf_model

    d = tmp_path / "phimoe-longrope"
    tiny_hf_model(d, "phimoe", rope_parameters=PHIMOE_LONGROPE)
    m = load(d, backend="native")
    assert m.module.args.ropes[0].rope_type == "phimoe_longrope"
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    ids = ids_for(m.config["vocab_size"], B=1, L=24, seed=2)
    for L in (12, 24):  # within the original 16 positions (short mscale), past them (long)
        assert_close(m.logits(ids[:, :L]), hf_logits(d, ids[:, :L]), 1e-5, f"phimoe longrope L={L}")
    module, P = m.module, 12
    cache = KVCache.allocate(module.args, 1, 24, torch.device("cpu"), torch.float32)
    pad = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        out = hf(ids[:, :P], use_cache=True)
        want, past = [out.logits[:, -1]], out.past_key_values
        got = [prefill(module, cache, ids[:, :P], pad)]
        for s in range(P, 24):  # positions 12 .. 23: the scale switches at position 16
            out = hf(ids[:, s:s + 1], cache=past, use_cache=True)
            want.append(out.logits[:, -1])
            past = out.past_key_values
            got.append(decode_step(module, cache, ids[:, s:s + 1], torch.tensor([s]), pad))
    assert_close(torch.stack(got, 1).float(), torch.stack(want, 1), 1e-5, "phimoe longrope decode")


@pytest.mark.parametrize("arch,over", [("phimoe", {}), ("glm4_moe", {}), ("glm4_moe", GLM4_GROUPED),
                                       ("deepseek_v3", {}), ("deepseek_v3", GLM4_GROUPED)])
def test_native_on_export_equals_mlx(zoo, arch, over):
    """The native class on an export of an mlx-lm model gives MLX's logits. phimoe: sparsemixer, LayerNorm
    biases, attention and lm_head biases as mlx-lm computes them (default rope: mlx-lm's longrope differs).
    glm4_moe: sigmoid group-limited routing with the correction bias and scale, shared experts, partial
    rotary, a dense first layer. deepseek_v3: the same MoE; latent attention (mlx-lm keeps `kv_b_proj` split
    as `embed_q` / `unembed_out`, the export joins them), interleaved rope."""
    import numpy as np

    from mlx_bridge import export
    from mlx_bridge.testing.adapters import probe_ids

    base = zoo.mlx(arch, **over)
    out = base.parent / f"{base.name}-native-export"
    if not out.exists():
        export(str(base), str(out))
    m = load(out, backend="native")
    assert m.backend == "native"
    ids = probe_ids(m.config["vocab_size"], n=2, length=40, seed=3)
    got = m.logits(torch.tensor(ids, dtype=torch.long))
    assert_close(got, torch.tensor(np.asarray(zoo.logits(base, ids=ids))), 1e-5, f"{arch} native vs MLX")


def test_glm4_moe_lite_native_on_export_is_mlx_but_for_the_latent_norms_eps(zoo, monkeypatch):
    """glm4_moe_lite: transformers' attention (`DeepseekV3Attention`) norms the q and kv latents with eps 1e-6,
    mlx-lm's with `rms_norm_eps`; the native class computes transformers'. With that eps swapped for the
    config's, the native class on an export of an mlx-lm glm4_moe_lite gives MLX's logits."""
    import numpy as np

    from mlx_bridge import export
    from mlx_bridge.deploy.native import mla
    from mlx_bridge.testing.adapters import probe_ids

    base = zoo.mlx("glm4_moe_lite")
    out = base.parent / f"{base.name}-native-export"
    if not out.exists():
        export(str(base), str(out))
    ids = probe_ids(json.loads((out / "config.json").read_text())["vocab_size"], n=2, length=40, seed=3)
    ref = torch.tensor(np.asarray(zoo.logits(base, ids=ids)))
    got = load(out, backend="native").logits(torch.tensor(ids, dtype=torch.long))
    assert 1e-5 < (got - ref).abs().max().item() < 1e-3  # the eps: a small, real difference
    monkeypatch.setattr(mla, "LATENT_EPS", json.loads((out / "config.json").read_text())["rms_norm_eps"])
    got = load(out, backend="native").logits(torch.tensor(ids, dtype=torch.long))
    assert_close(got, ref, 1e-5, "glm4_moe_lite native (mlx-lm's latent eps) vs MLX")
