"""What the native model classes need from a Hugging Face config: one `ModelArgs`, one parser per arch.

The config is first read by transformers (`AutoConfig`), which applies each arch's defaults and migrates
old layouts (`rope_scaling` -> `rope_parameters`, `sliding_window_pattern` -> `layer_types`), so the
numbers here are the ones transformers itself runs with. The parsers are a registry keyed by
`model_type` (mlx-lm `_get_classes` style); an arch or feature they do not cover raises `Unsupported`,
and `load(backend="auto")` then runs the model through transformers instead.

Example:
    >>> from transformers import AutoConfig                                  # doctest: +SKIP
    >>> args = ModelArgs.from_hf(AutoConfig.for_model("llama", num_hidden_layers=2))  # doctest: +SKIP
    >>> args.num_layers, args.windows                                        # doctest: +SKIP
    (2, [None, None])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

# rope_type values the native classes compute (see rope.py); others go to transformers
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


class Unsupported(Exception):
    """The native classes do not implement this config (the message says which field)."""


@dataclass
class RopeArgs:
    rope_type: str = "default"
    theta: float = 10000.0
    dim: int = 0  # rotated dims (head_dim * partial_rotary_factor)
    params: dict = field(default_factory=dict)  # the full rope_parameters entry (factor, ...)
    max_position_embeddings: int = 2048


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the eps of every norm (phimoe's LayerNorms too)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False  # bias on q/k/v
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (qwen3, gemma3)
    qk_norm_full: bool = False  # olmoe: RMSNorm over the whole q / k projection (all heads) instead
    clip_qkv: float | None = None  # olmoe: q, k, v clamped to [-clip, clip]
    fused_qkv: bool = False  # phi3 qkv_proj / gate_up_proj
    layer_norm: bool = False  # phimoe: LayerNorm with weight and bias (eps rms_norm_eps) instead of RMSNorm
    lm_head_bias: bool = False
    gemma: bool = False  # norms scale by (1 + w), sandwich norms, embeddings * sqrt(hidden)
    attn_scale: float = 0.0  # softmax scale; 0 -> head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: list = field(default_factory=list)  # per layer: sliding window size or None
    ropes: list = field(default_factory=list)  # per layer: RopeArgs
    # MoE
    moe: str | None = None  # the model_type of a MoE type ("mixtral", "qwen3_moe", ..., "glm4_moe", "deepseek_v3")
    moe_layers: list = field(default_factory=list)  # per layer: True when the MLP is sparse
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # qwen2_moe: a shared expert MLP, gated by sigmoid
    sinks: bool = False  # gpt_oss: a learned sink logit per head in every softmax
    swiglu_alpha: float = 1.702  # gpt_oss experts: (up + 1) * g * sigmoid(alpha g), g and up clamped
    swiglu_limit: float = 7.0
    router_jitter: float = 0.0  # phimoe: sparsemixer's jitter_eps (`router_jitter_noise`), used at inference too
    # glm4_moe: sigmoid scores, group-limited top-k (n_group, topk_group), scaled; an ungated shared MLP
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_experts_intermediate_size: int = 0  # `shared_experts` (moe_intermediate_size * n_shared_experts)
    # deepseek_v3: multi-head latent attention (mla.py); kv_lora_rank 0 = the usual attention
    q_lora_rank: int = 0  # 0: one q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary dims as pairs (x0, x1), ... (`apply_rotary_pos_emb_interleave`)

    @classmethod
    def from_hf(cls, config: Any) -> "ModelArgs":
        """Build from a transformers `PretrainedConfig`; raise `Unsupported` naming the field."""
        mt = config.model_type
        if mt not in PARSERS:
            raise Unsupported(f"model_type {mt!r} has no native class")
        args = PARSERS[mt](config)
        if args.moe and args.moe != "gpt_oss" and args.hidden_act != "silu":  # the routed expert kernels compute silu(gate) * up
            raise Unsupported(f"hidden_act {args.hidden_act!r} in MoE experts (native: silu)")
        return args

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a config.json dict (read through transformers' config class for its defaults)."""
        from transformers import AutoConfig

        if not d.get("model_type"):
            raise Unsupported("config has no model_type")
        rest = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
        return cls.from_hf(AutoConfig.for_model(d["model_type"], **rest))


def _get(c, name, default=None):
    v = getattr(c, name, default)
    return default if v is None else v


def _rope(c, head_dim: int, layer_type: str | None) -> RopeArgs:
    rp = getattr(c, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in rp and isinstance(rp[layer_type], dict):
        rp = rp[layer_type]
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if c.model_type == "phimoe" and rope_type != "default":  # `PhimoeRotaryEmbedding`: not the shared longrope
        if rope_type != "longrope":
            raise Unsupported(f"rope_parameters.rope_type {rope_type!r} in phimoe (native: default, longrope)")
        rope_type = "phimoe_longrope"  # rope.py: short factors always, short/long mscale by position
    elif rope_type not in ROPE_TYPES:
        raise Unsupported(f"rope_parameters.rope_type {rope_type!r} (native: {', '.join(ROPE_TYPES)})")
    dim = int(head_dim * rp.get("partial_rotary_factor", _get(c, "partial_rotary_factor", 1.0)))
    return RopeArgs(rope_type, float(rp["rope_theta"]), dim, dict(rp), int(_get(c, "max_position_embeddings", 2048)))


def _base(c, **kw) -> ModelArgs:
    heads = c.num_attention_heads
    head_dim = _get(c, "head_dim") or c.hidden_size // heads
    n = c.num_hidden_layers
    act = _get(c, "hidden_activation") or _get(c, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise Unsupported(f"hidden_act {act!r}")
    layer_types = list(getattr(c, "layer_types", None) or ["full_attention"] * n)
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise Unsupported(f"layer_types {sorted(set(layer_types))}")
    window = getattr(c, "sliding_window", None)
    if kw.pop("window_all_layers", False):  # mistral/mixtral/phi3/qwen3_moe: one window for every layer
        windows = [window] * n
    else:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    nested = _nested(c)  # gemma3: rope_parameters per layer type
    args = ModelArgs(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=_get(c, "intermediate_size", 0), num_layers=n, num_heads=heads,
        num_kv_heads=_get(c, "num_key_value_heads", heads), head_dim=head_dim,
        rms_norm_eps=float(_get(c, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_get(c, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), hidden_act=act, windows=windows,
        ropes=[_rope(c, head_dim, t if nested else None) for t in layer_types],
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _nested(c) -> bool:
    rp = getattr(c, "rope_parameters", None) or {}
    return any(isinstance(v, dict) for v in rp.values())


def _llama(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, mlp_bias=bool(_get(c, "mlp_bias", False)))


def _mistral(c) -> ModelArgs:
    return _base(c, window_all_layers=True)


def _qwen2(c) -> ModelArgs:
    return _base(c, qkv_bias=True)


def _qwen3(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, qk_norm=True)


def _phi3(c) -> ModelArgs:
    return _base(c, fused_qkv=True, window_all_layers=True)


def _gemma2(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, gemma=True, qkv_bias=bias, o_bias=bias, attn_scale=c.query_pre_attn_scalar ** -0.5,
                 attn_softcap=getattr(c, "attn_logit_softcapping", None),
                 final_softcap=getattr(c, "final_logit_softcapping", None))


def _gemma3_text(c) -> ModelArgs:
    if getattr(c, "use_bidirectional_attention", False):
        raise Unsupported("use_bidirectional_attention is true")
    args = _gemma2(c)
    args.qk_norm = True
    return args


def _mixtral(c) -> ModelArgs:
    n = c.num_hidden_layers
    return _base(c, window_all_layers=True, moe="mixtral", moe_layers=[True] * n, num_experts=c.num_local_experts,
                 top_k=c.num_experts_per_tok, moe_intermediate_size=c.intermediate_size, norm_topk_prob=True)


def _qwen_sparse(c) -> list[bool]:
    """Which layers are sparse (`Qwen2MoeDecoderLayer`/`Qwen3MoeDecoderLayer`)."""
    n, only = c.num_hidden_layers, set(_get(c, "mlp_only_layers", []))
    step, e = _get(c, "decoder_sparse_step", 1), _get(c, "num_experts", 0)
    return [i not in only and e > 0 and (i + 1) % step == 0 for i in range(n)]


def _qwen3_moe(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, qk_norm=True, window_all_layers=True, moe="qwen3_moe",
                 moe_layers=_qwen_sparse(c), num_experts=_get(c, "num_experts", 0), top_k=c.num_experts_per_tok,
                 moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob))


def _qwen2_moe(c) -> ModelArgs:
    return _base(c, qkv_bias=bool(_get(c, "qkv_bias", True)), moe="qwen2_moe", moe_layers=_qwen_sparse(c),
                 num_experts=_get(c, "num_experts", 0), top_k=c.num_experts_per_tok,
                 moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
                 shared_expert_intermediate_size=int(_get(c, "shared_expert_intermediate_size", 0)))


def _olmoe(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, qk_norm_full=True, clip_qkv=getattr(c, "clip_qkv", None),
                 moe="olmoe", moe_layers=[True] * c.num_hidden_layers, num_experts=c.num_experts,
                 top_k=c.num_experts_per_tok, moe_intermediate_size=c.intermediate_size,
                 norm_topk_prob=bool(c.norm_topk_prob))


def _gpt_oss(c) -> ModelArgs:
    bias = bool(_get(c, "attention_bias", True))
    return _base(c, qkv_bias=bias, o_bias=bias, sinks=True, moe="gpt_oss", moe_layers=[True] * c.num_hidden_layers,
                 num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, moe_intermediate_size=c.intermediate_size,
                 swiglu_alpha=float(_get(c, "swiglu_alpha", 1.702)), swiglu_limit=float(_get(c, "swiglu_limit", 7.0)))


def _phimoe(c) -> ModelArgs:
    """`PhimoeForCausalLM`: LayerNorms with biases, sparsemixer routing (always 2 experts: transformers'
    `sparsemixer` ignores `num_experts_per_tok`), and its own longrope (`PhimoeRotaryEmbedding`)."""
    if c.num_experts_per_tok != 2:  # transformers routes 2, mlx-lm's sparsemixer loops num_experts_per_tok times
        raise Unsupported(f"num_experts_per_tok {c.num_experts_per_tok} in phimoe (sparsemixer routes 2)")
    if getattr(c, "tie_word_embeddings", False) and _get(c, "lm_head_bias", False):
        raise Unsupported("tie_word_embeddings with lm_head_bias in phimoe")
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, layer_norm=True, lm_head_bias=bool(_get(c, "lm_head_bias", False)),
                 window_all_layers=True, moe="phimoe", moe_layers=[True] * c.num_hidden_layers,
                 num_experts=c.num_local_experts, top_k=2, moe_intermediate_size=c.intermediate_size,
                 router_jitter=float(_get(c, "router_jitter_noise", 0.0)))


def _group_moe(c) -> dict:
    """The MoE fields of glm4_moe, glm4_moe_lite and deepseek_v3 (the same `TopkRouter`, experts and shared
    experts): dense MLPs in the first `first_k_dense_replace` layers (glm4_moe_lite: where `mlp_layer_types`
    says "dense"); sigmoid routing with `e_score_correction_bias`, group-limited top-k,
    `routed_scaling_factor`; `shared_experts` added ungated."""
    E, groups = c.n_routed_experts, _get(c, "n_group", 1)
    if E % groups or E // groups < 2:  # each group's score is the sum of its 2 best experts
        raise Unsupported(f"n_routed_experts {E} in {groups} groups of at least 2 (n_group)")
    n, kinds = c.num_hidden_layers, getattr(c, "mlp_layer_types", None)
    if kinds is not None and set(kinds) - {"dense", "sparse"}:
        raise Unsupported(f"mlp_layer_types {sorted(set(kinds))}")
    sparse = [t == "sparse" for t in kinds] if kinds is not None else [i >= c.first_k_dense_replace for i in range(n)]
    return dict(moe=c.model_type, moe_layers=sparse, num_experts=E,
                top_k=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                norm_topk_prob=bool(c.norm_topk_prob), n_group=groups, topk_group=_get(c, "topk_group", 1),
                routed_scaling_factor=float(_get(c, "routed_scaling_factor", 1.0)),
                shared_experts_intermediate_size=c.moe_intermediate_size * _get(c, "n_shared_experts", 0))


def _glm4_moe(c) -> ModelArgs:
    """`Glm4MoeForCausalLM`: GQA with partial rotary and optional q/k norms (no o_proj bias), `_group_moe`."""
    return _base(c, qkv_bias=bool(_get(c, "attention_bias", False)), qk_norm=bool(_get(c, "use_qk_norm", False)),
                 **_group_moe(c))


def _deepseek_v3(c) -> ModelArgs:
    """`DeepseekV3ForCausalLM` and `Glm4MoeLiteForCausalLM` (the same attention and MoE): multi-head latent
    attention (mla.py; rope on the qk_rope_head_dim part, the softmax scale times yarn's mscale(factor,
    mscale_all_dim) squared as `yarn_apply_mscale`), `_group_moe`. `num_key_value_heads` plays no part:
    every head has its own expanded key."""
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    scale, rp = qk ** -0.5, getattr(c, "rope_parameters", None) or {}
    if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim", 0):
        f = rp["factor"]
        m = 1.0 if f <= 1 else 0.1 * rp["mscale_all_dim"] * math.log(f) + 1.0
        scale = scale * m * m
    bias = bool(_get(c, "attention_bias", False))
    return _base(c, qkv_bias=bias, o_bias=bias, attn_scale=scale, q_lora_rank=_get(c, "q_lora_rank", 0),
                 kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                 v_head_dim=c.v_head_dim, rope_interleave=bool(_get(c, "rope_interleave", True)), **_group_moe(c))


# model_type -> parser (the registry of native architectures)
PARSERS: dict[str, Callable[[Any], ModelArgs]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3,
    "gemma2": _gemma2, "gemma3_text": _gemma3_text, "mixtral": _mixtral, "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe, "olmoe": _olmoe, "gpt_oss": _gpt_oss,
    "phimoe": _phimoe, "glm4_moe": _glm4_moe, "deepseek_v3": _deepseek_v3, "glm4_moe_lite": _deepseek_v3,
}
