"""MoE pieces on CPU against transformers' own modules: routing of every native MoE type, the PyTorch
reference of the routed experts (both expert layouts), the static-shape row grouping the CUDA kernels
use, and the stacked experts' memory and names."""

import importlib

import pytest
import torch

from mlx_bridge.deploy.native.config import ModelArgs
from mlx_bridge.deploy.native.moe import SparseMoe, align, experts_ref, group_route, route

SMALL = dict(hidden_size=32, intermediate_size=24, moe_intermediate_size=24, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
# model_type -> (module, router class, experts class, {config fields})
TYPES = {
    "mixtral": ("mixtral", "MixtralTopKRouter", "MixtralExperts", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeTopKRouter", "Qwen2MoeExperts",
                  dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeExperts",
                  dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
    "olmoe": ("olmoe", "OlmoeTopKRouter", "OlmoeExperts", dict(num_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("gpt_oss", "GptOssTopKRouter", "GptOssExperts", dict(num_local_experts=8, num_experts_per_tok=2)),
    # a wide jitter band, so the second round's softmax often has several experts
    "phimoe": ("phimoe", "PhimoeTopKRouter", "PhimoeExperts",
               dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.3)),
}


def hf_modules(mt: str, seed: int = 0):
    """(config, router, experts) of transformers' classes for `mt`, random weights."""
    from transformers import AutoConfig

    mod, router_cls, experts_cls, kw = TYPES[mt]
    cfg = AutoConfig.for_model(mt, **SMALL, **kw)
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    torch.manual_seed(seed)
    router, experts = getattr(m, router_cls)(cfg).eval(), getattr(m, experts_cls)(cfg).eval()
    with torch.no_grad():
        for p in [*router.parameters(), *experts.parameters()]:
            p.normal_(0, 0.3)
    return cfg, router, experts


def routed_case(layout: str, T: int, dims: tuple, dtype, device: str = "cpu", seed: int = 0):
    """Random inputs of the routed-experts kernels, (x, w, idx, ex, glu) with dims (E, k, D, I): layout
    "rows" (E, 2I, D) / (E, D, I), "gpt_oss" (E, D, 2I) interleaved / (E, I, D) with biases and the
    clamped SwiGLU, "gpt_oss_stacked" the same as `SparseMoe.stack` keeps them (transposed views of
    row-major copies)."""
    E, k, D, I = dims
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, s=0.05):
        return (torch.randn(*shape, device=device, generator=g) * s).to(dtype)

    x = rand(T, D, s=1.0)
    if layout.startswith("gpt_oss"):
        ex, glu = (rand(E, D, 2 * I, s=0.3), rand(E, 2 * I, s=0.5), rand(E, I, D), rand(E, D)), (1.702, 7.0)
        if layout == "gpt_oss_stacked":
            ex = (ex[0].transpose(1, 2).contiguous().transpose(1, 2), ex[1],
                  ex[2].transpose(1, 2).contiguous().transpose(1, 2), ex[3])
    else:
        ex, glu = (rand(E, 2 * I, D), None, rand(E, D, I), None), None
    w, idx = route(rand(T, E, s=1.0), "gpt_oss" if glu else "qwen3_moe", k, True)
    return x, w, idx, ex, glu


def routed_error(y: torch.Tensor, case: tuple) -> float:
    """Relative error of the kernels' (T k, D) rows, summed per token, against `experts_ref` in float64."""
    x, w, idx, ex, glu = case
    got = y.view(*idx.shape, x.shape[1]).sum(1).to(x.dtype)
    assert y.dtype == torch.float32 and got.isfinite().all()
    ref = experts_ref(x.double(), w.double(), idx, tuple(t if t is None else t.double() for t in ex), glu)
    return ((got.double() - ref).norm() / ref.norm()).item()


def test_route_example():
    w, idx = route(torch.tensor([[0.0, 2.0, 1.0]]), "mixtral", top_k=2, norm=True)
    assert idx.tolist() == [[1, 2]] and w.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mt", list(TYPES))
def test_routing_equals_transformers(mt, dtype):
    cfg, router, _ = hf_modules(mt)
    router = router.to(dtype)
    x = torch.randn(40, SMALL["hidden_size"]).to(dtype)
    a = ModelArgs.from_hf(cfg)
    with torch.no_grad():
        ref = router(x)
        w, idx = route(torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None)), a.moe, a.top_k,
                       a.norm_topk_prob, a.router_jitter)
    ref_w, ref_idx = ref[-2], ref[-1]  # (logits, weights, ids); gpt_oss returns the same three
    assert torch.equal(idx, ref_idx)
    assert w.dtype == ref_w.dtype and torch.equal(w, ref_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("jitter", [0.0, 0.01, 0.1, 0.5])
def test_sparsemixer_equals_transformers(jitter, dtype):
    """phimoe's router at inference, bitwise, on logits with near ties, equal logits and signs mixed
    (the relative band `(top - s) / max(|s|, top)` sees them all)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    g = torch.Generator().manual_seed(int(jitter * 100))
    base = torch.randn(64, 16, generator=g)
    near = base.clone()
    near[:, 1] = near[:, 0] * (1 - 0.5 * jitter) + 1e-3  # within (or at the edge of) the band of expert 0
    tied = base.clone()
    tied[:, 3] = tied[:, 5] = tied.max(-1).values  # two experts share the best logit
    for scores in (base, near, tied, base - 3.0, base * 0.01):
        scores = scores.to(dtype)
        ref_w, ref_idx = sparsemixer(scores, jitter_eps=jitter, training=False)
        w, idx = route(scores, "phimoe", 2, True, jitter)
        assert torch.equal(idx, ref_idx) and w.dtype == ref_w.dtype and torch.equal(w, ref_w)


# glm4_moe: 16 experts in 4 groups, the best 2 groups kept, top-4 of them, scaled
GROUPED = dict(num_local_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               first_k_dense_replace=0)


def group_router(norm: bool, seed: int = 0):
    """(config, transformers' `Glm4MoeTopkRouter`) with random weights and correction bias (float32)."""
    from transformers import AutoConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    cfg = AutoConfig.for_model("glm4_moe", **SMALL, **GROUPED, norm_topk_prob=norm)
    torch.manual_seed(seed)
    router = Glm4MoeTopkRouter(cfg).eval()
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.normal_(0, 0.3)
    return cfg, router


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_group_routing_equals_transformers(norm, dtype):
    """glm4_moe's sigmoid group-limited routing, bitwise: the router stays float32 (transformers keeps it so),
    tokens in the model dtype; also with a group tie (two groups' best two sum alike)."""
    cfg, router = group_router(norm)
    a = ModelArgs.from_hf(cfg)
    assert (a.moe, a.n_group, a.topk_group, a.routed_scaling_factor, a.top_k) == ("glm4_moe", 4, 2, 2.5, 4)
    x = torch.randn(40, SMALL["hidden_size"]).to(dtype)
    with torch.no_grad():
        for bias in (router.e_score_correction_bias.clone(), torch.zeros(16)):
            router.e_score_correction_bias.copy_(bias)
            _, ref_w, ref_idx = router(x)
            w, idx = group_route(torch.nn.functional.linear(x.float(), router.weight), bias, a.top_k, a.norm_topk_prob,
                                 a.n_group, a.topk_group, a.routed_scaling_factor)
            assert torch.equal(idx, ref_idx) and w.dtype == ref_w.dtype == torch.float32 and torch.equal(w, ref_w)


def test_group_routing_equals_mlx_lm():
    """The same choice and weights as mlx-lm's `group_expert_select` (float32). mlx-lm zeroes the dropped groups'
    scores where transformers sets -inf: the two agree while every kept score + bias is positive (bias >= 0 here)."""
    mx = pytest.importorskip("mlx.core")
    import numpy as np
    from mlx_lm.models.glm4_moe import group_expert_select

    cfg, router = group_router(True, seed=2)
    bias = router.e_score_correction_bias.abs()
    logits = torch.randn(64, 16) * 2
    w, idx = group_route(logits, bias, 4, True, 4, 2, 2.5)
    m_idx, m_w = group_expert_select(mx.array(logits.numpy()), mx.array(bias.numpy()), 4, 4, 2, 2.5, True)
    m_idx, m_w = torch.tensor(np.array(m_idx)).long(), torch.tensor(np.array(m_w))
    order, m_order = idx.argsort(-1), m_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), m_idx.gather(1, m_order))
    torch.testing.assert_close(w.gather(1, order), m_w.gather(1, m_order), rtol=1e-6, atol=1e-7)


def test_group_router_kept_in_float32_when_loaded_in_bfloat16(tmp_path):
    """`gate.weight` and `e_score_correction_bias` load as float32 in a bfloat16 model (transformers'
    `_keep_in_fp32_modules_strict`), a float32 checkpoint's values unrounded; the experts are bfloat16."""
    from safetensors import safe_open

    from mlx_bridge.deploy.loader import load
    from mlx_bridge.testing import tiny_hf_model

    tiny_hf_model(tmp_path / "m", "glm4_moe")
    m = load(tmp_path / "m", dtype="bfloat16", backend="native")
    moe = m.module.model.layers[1].mlp
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("model.layers.1.mlp.gate.weight")
    assert moe.gate.weight.dtype == moe.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.weight, saved) and moe.stacked[0].dtype == torch.bfloat16


@pytest.mark.parametrize("mt", ["mixtral", "qwen3_moe", "gpt_oss", "phimoe"])
def test_experts_reference_equals_transformers(mt):
    cfg, router, experts = hf_modules(mt, seed=1)
    a = ModelArgs.from_hf(cfg)
    x = torch.randn(40, SMALL["hidden_size"])
    with torch.no_grad():
        _, w, idx = router(x)
        ref = experts(x, idx, w)
        p = dict(experts.named_parameters())
        if mt == "gpt_oss":
            glu = (a.swiglu_alpha, a.swiglu_limit)
            ex = (p["gate_up_proj"], p["gate_up_proj_bias"], p["down_proj"], p["down_proj_bias"])
            got = experts_ref(x, w, idx, ex, glu)
            moved = (ex[0].transpose(1, 2).contiguous().transpose(1, 2), ex[1],  # as `SparseMoe.stack` keeps them
                     ex[2].transpose(1, 2).contiguous().transpose(1, 2), ex[3])
            torch.testing.assert_close(experts_ref(x, w, idx, moved, glu), ref, rtol=1e-5, atol=1e-5)
        else:
            got = experts_ref(x, w, idx, (p["gate_up_proj"], None, p["down_proj"], None))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,k,E,BM", [(1, 8, 128, 16), (3, 2, 4, 16), (32, 8, 128, 16), (512, 8, 128, 64), (7, 4, 5, 2)])
def test_align_groups_every_row_once_by_expert(T, k, E, BM):
    g = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # distinct experts a row
    ids, bexp = align(idx, E, BM)
    R = T * k
    assert ids.shape == (bexp.numel() * BM,) and bexp.numel() == -(-(R + min(E, R) * (BM - 1)) // BM)
    real = ids[ids < R]
    assert sorted(real.tolist()) == list(range(R))  # every routed row exactly once
    flat = idx.reshape(-1)
    blocks = ids.view(-1, BM)
    for b, e in enumerate(bexp.tolist()):
        rows = blocks[b][blocks[b] < R]
        if e == E:  # past the last expert: only padding
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows] == e).all())
            assert rows.tolist() == sorted(rows.tolist())


def test_stack_keeps_names_and_shares_memory():
    a = ModelArgs("qwen3_moe", 64, 16, 32, 1, 2, 1, 8, moe="qwen3_moe", moe_layers=[True], num_experts=4,
                  top_k=2, moe_intermediate_size=8)
    moe = SparseMoe(a)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    gate_up, _, down, _ = moe.stack()
    assert gate_up.shape == (4, 16, 16) and down.shape == (4, 16, 8)
    after = moe.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert moe.experts[2].up_proj.weight.data_ptr() == gate_up[2, 8:].data_ptr()
    assert moe.stack() is moe.stacked  # once
    x = torch.randn(1, 5, 16)
    moe.to(torch.float64)  # a cast copies the experts: stacked again from the new ones
    assert moe.stacked is None and moe(x.double()).dtype == torch.float64


def test_tiny_override_wins_over_an_aliased_default():
    """gpt_oss maps `num_experts` to `num_local_experts`: an override of either name is kept (the GPU
    test that poisons unused experts builds a 32-expert gpt_oss this way; it used to get 4)."""
    from transformers import AutoConfig

    from mlx_bridge.archs.tiny import tiny_config

    for mt, name in (("gpt_oss", "num_local_experts"), ("mixtral", "num_local_experts"), ("qwen3_moe", "num_experts")):
        cfg = AutoConfig.for_model(mt, **tiny_config(mt, **{name: 32}))
        assert getattr(cfg, name) == 32, mt


def test_phimoe_configs_the_native_class_does_not_compute():
    """transformers' sparsemixer routes 2 experts whatever `num_experts_per_tok` says (mlx-lm's routes that
    many): refused, as are rope types `PhimoeRotaryEmbedding` does not compute like the shared ones."""
    from transformers import AutoConfig

    from mlx_bridge.deploy.native.config import Unsupported

    assert ModelArgs.from_hf(AutoConfig.for_model("phimoe", **SMALL)).top_k == 2
    with pytest.raises(Unsupported, match="num_experts_per_tok 3 in phimoe"):
        ModelArgs.from_hf(AutoConfig.for_model("phimoe", **SMALL, num_experts_per_tok=3))
    with pytest.raises(Unsupported, match="rope_type 'linear' in phimoe"):
        ModelArgs.from_hf(AutoConfig.for_model("phimoe", **SMALL, rope_parameters={
            "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "short_mscale": 1.0, "long_mscale": 1.0}))


def test_glm4_moe_configs_the_native_class_does_not_compute():
    from transformers import AutoConfig

    from mlx_bridge.deploy.native.config import Unsupported

    with pytest.raises(Unsupported, match="n_routed_experts 16 in 16 groups of at least 2"):
        ModelArgs.from_hf(AutoConfig.for_model("glm4_moe", **SMALL, **{**GROUPED, "n_group": 16}))
    a = ModelArgs.from_hf(AutoConfig.for_model("glm4_moe", **{**SMALL, **GROUPED, "first_k_dense_replace": 1,
                                                                "num_hidden_layers": 3}))
    assert a.moe_layers == [False, True, True] and a.shared_experts_intermediate_size == 24
