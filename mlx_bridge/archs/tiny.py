"""Tiny test configs per model type (2 layers, hidden 64) and the hub-style fields their checkpoints carry.

`tiny_config(t)` is what `testing.tiny_hf_model` and `scripts/derive_archs.py` build a random
transformers model from: the shared shape `BASE`, the generic size fields `GENERIC` where the type's
config class has them, then the type's own `TINY` overrides. `hub_style(t, cfg)` adds the v4-style
fields that hub checkpoints of a type carry and mlx-lm requires (transformers v5 writes only nested
`rope_parameters` and its own names).

Example:
    >>> tiny_config("llama")["hidden_size"]
    64
"""

from __future__ import annotations

import json

BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
)
# size fields set wherever the config class has them (MoE, MLA, linear attention, vision towers)
GENERIC = dict(
    head_dim=16, num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2,
    decoder_sparse_step=1, mlp_only_layers=[],
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8, num_channels=3, depth=1, num_heads=2, embed_dim=32, out_hidden_size=64,
              num_position_embeddings=16, deepstack_visual_indexes=[0], vision_output_dim=64,
              projector_input_dim=64, projector_output_dim=64)

# hub Qwen3.5 configs carry an mrope section (mlx-vlm requires one): 2 rotary pairs of head_dim 16 x 0.25
_QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                 "mrope_interleaved": True}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2

# Gemma 4's features at once, so the derivation sees every tensor: per-layer inputs and kv-shared layers with a
# double-wide MLP (E2B/E4B), MoE beside the MLP and k = v on global layers (26B-A4B, 31B); hub Gemma 4 ties
_GEMMA4_TEXT = {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 16,
                "global_head_dim": 32, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
                "vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8, "final_logit_softcapping": 30.0,
                "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32,
                "attention_k_eq_v": True, "num_global_key_value_heads": 1, "tie_word_embeddings": True}

# per-type overrides (after GENERIC); these are the configs the parity tests run. The LEGACY types'
# entries are complete (GENERIC is not applied to them: their test models stay as they were).
TINY: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 3},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "tie_word_embeddings": True,
               "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "tie_word_embeddings": True,
                    "sliding_window_pattern": 2},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "cohere": {"tie_word_embeddings": True, "layer_norm_eps": 1e-5},
    "ernie4_5": {"head_dim": 16},
    "exaone4": {"head_dim": 16, "sliding_window": 16, "sliding_window_pattern": 2},
    "gemma": {"head_dim": 16, "tie_word_embeddings": True},
    "granite": {},
    "helium": {"head_dim": 16},
    "hunyuan_v1_dense": {"head_dim": 16},
    "internlm3": {"head_dim": 16},
    "nemotron": {},
    "olmo2": {},
    "olmo3": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16, "rope_theta": 500000.0},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"head_dim": 16, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": 8},
    "seed_oss": {"head_dim": 16},
    "stablelm": {},
    "starcoder2": {},
    "gptj": {"rotary_dim": 8},
    "gpt2": {"tie_word_embeddings": True},
    "deepseek_v3": {"head_dim": 8},  # transformers rotates head_dim = qk_rope_head_dim
    "glm4_moe_lite": {"head_dim": 8},
    "glm4_moe": {"use_qk_norm": True},  # GLM-4.5 (355B) normalises q/k; traced so its q_norm/k_norm have rules
    # transformers' MLA + indexer: kv heads = heads; the indexer keeps 8 keys, so the 24-token parity probes use it
    "deepseek_v32": {"head_dim": 8, "num_key_value_heads": 4, "index_topk": 8},
    "glm_moe_dsa": {"head_dim": 8, "num_key_value_heads": 4, "index_topk": 8},
    "falcon_h1": {"head_dim": 64},
    "mistral4": {"head_dim": 16},  # rotates head_dim * partial_rotary_factor (0.5) = qk_rope_head_dim (8)
    "minicpm3": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                     "long_factor": [1.0] * 4, "original_max_position_embeddings": 128}},
    "gpt_bigcode": {"n_inner": 256},
    "lfm2": {"layer_types": ["conv", "full_attention"], "tie_word_embeddings": True},
    "exaone_moe": {"mlp_layer_types": ["dense", "sparse"]},
    # hub Gemma 4 configs: global layers with their own head_dim (global_head_dim; transformers 5 keeps it in
    # per_layer_config), per-layer input embeddings, the final softcap
    "gemma4_text": _GEMMA4_TEXT,
    # hub Gemma 4 checkpoints carry a vision tower (E2B/E4B an audio tower too), which mlx-lm drops
    "gemma4": {"text_config": _GEMMA4_TEXT, "tie_word_embeddings": True,
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                                 "position_embedding_size": 64, "patch_size": 4},
               "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "subsampling_conv_channels": [8, 4], "output_proj_dims": 32}},
    # transformers' encoder-free Gemma 4 has neither per-layer inputs nor MoE (mlx-lm's gemma4 reads both from the config)
    "gemma4_unified": {"text_config": {**_GEMMA4_TEXT, "hidden_size_per_layer_input": 0, "enable_moe_block": False},
                       "tie_word_embeddings": True},
    # hub Kimi-Linear: no q low-rank (q_lora_rank null; mlx-lm has only q_proj)
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"], "linear_num_heads": 4, "linear_head_dim": 16,
                    "q_lora_rank": None},
    # rotary dims even (hub: 0.334 of 192)
    "mimo_v2_flash": {"layer_types": ["full_attention", "sliding_attention"], "mlp_layer_types": ["dense", "sparse"],
                      "sliding_window": 9, "rope_theta": 500000.0, "rope_parameters": {
                          t: {"rope_type": "default", "rope_theta": th, "partial_rotary_factor": 0.5}
                          for t, th in (("full_attention", 500000.0), ("sliding_attention", 10000.0))}},
    "longcat_flash": {"num_layers": 2, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32, "moe_topk": 2,
                      "zero_expert_num": 2},
    "muse_spark": {"out_hidden_size": 64, "projector_hidden_size": 64,
                   "text_config": {"layer_rope_theta": [500000.0, 0], "moe_hidden_size": 32, "sliding_window": 16},
                   "vision_config": {"pos_emb_height": 4, "pos_emb_width": 4, "patch_size": 4},
                   "audio_config": {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "out_hidden_size": 64}},
    "minimax_m3_vl": {"projector_hidden_size": 64, "merged_hidden_size": 128,
                      "text_config": {"shared_intermediate_size": 32, "dense_intermediate_size": 128,
                                      "index_head_dim": 16, "index_block_size": 4, "index_topk_blocks": 2,
                                      "rotary_dim": 16}},
    "muse_glimmer": {"out_hidden_size": 128, "projector_hidden_size": 64, "text_config": {"sliding_window": 16},
                     "vision_config": {"pos_emb_height": 4, "pos_emb_width": 4, "patch_size": 4}},
    # q, k, v convolutions of one size: transformers' save splits its fused conv1d into 3 equal chunks
    "olmo_hybrid": {"linear_num_value_heads": 2},
    "kimi_k25": {"text_config": {"head_dim": 8}},  # DeepSeek-V3 text model: rotates head_dim = qk_rope_head_dim
    # transformers' lfm2_moe has no default layer_types; one dense layer, then MoE (num_dense_layers)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1, "tie_word_embeddings": True},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # hub DBRX clips q, k, v at 8 (mlx-lm always clips: a null clip_qkv fails in it)
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "nemotron_h": {"mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1,
                   "hybrid_override_pattern": "M*-E"},  # every block kind, as released Nemotron-H mixes them
    "deepseek_v2": {"head_dim": 8, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                    "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                    "mscale_all_dim": 1.0}},
    # hub checkpoints tie the embeddings (mlx-lm's module always does)
    "cohere2": {"tie_word_embeddings": True, "sliding_window": 16, "sliding_window_pattern": 2},
    "gpt_neox": {"intermediate_size": 256},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    # rms_norm_eps 1e-6: llama.cpp's qwen35 takes its gated-delta-net l2 norm's epsilon from it (transformers: 1e-6)
    "qwen3_5": {"text_config": {"layer_types": ["linear_attention", "full_attention"], "rms_norm_eps": 1e-6,
                                "rope_parameters": _QWEN3_5_ROPE}},
    "qwen3_5_moe": {"text_config": {"layer_types": ["linear_attention", "full_attention"], "num_experts": 4,
                                    "rms_norm_eps": 1e-6, "rope_parameters": _QWEN3_5_ROPE}},
    "afmoe": {"layer_types": ["sliding_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 1},
    # 16 patches a side: mlx-vlm's projector pools them to the default 256 image tokens (kernel 1)
    "gemma3": {"text_config": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16,
                               "query_pre_attn_scalar": 16},
               "vision_config": {"image_size": 128, "vision_use_head": False}},  # mlx-lm's gpt_neox MLP is 4 * hidden_size whatever the config says
    "qwen2_5_vl": {"tie_word_embeddings": True, "text_config": {"rope_parameters": _MROPE}},
    "qwen3_vl": {"text_config": {"tie_word_embeddings": False, "rope_parameters": _MROPE}},
    # recurrent, recurrent, attention: mlx-lm's recurrent_gemma needs the whole block pattern; one kv head (MQA)
    "recurrent_gemma": {"num_hidden_layers": 3, "num_key_value_heads": 1},
    # mlx-lm's llama4_text is the dense text model (every layer an MLP of intermediate_size_mlp); it names an
    # untied head `output` (no hub checkpoint does), so only tied ones load; chunks of 8 (hub: 8192) so the 24-token
    # parity probes cross them
    "llama4_text": {"moe_layers": [], "intermediate_size_mlp": 128, "tie_word_embeddings": True,
                    "attention_chunk_size": 8},
    # hidden != 2 x moe_intermediate_size: transformers tells the hub's transposed experts by their shape
    "qwen3_vl_moe": {"text_config": {"moe_intermediate_size": 16}},
    "qwen2_vl": {"tie_word_embeddings": True, "text_config": {"rope_parameters": _MROPE}},
    # mlx-lm's llama4 routes to one expert and makes every 4th layer global (4 layers at least)
    # interleave 2: dense and MoE layers, as Llama-4-Maverick has them
    "llama4": {"text_config": {"num_experts_per_tok": 1, "num_hidden_layers": 4, "attention_chunk_size": 8,
                               "interleave_moe_layer_step": 2, "intermediate_size_mlp": 64}},
    # hub Phi-3.5-MoE: biased attention and lm_head (mlx-lm's phimoe always has them)
    "phimoe": {"attention_bias": True, "lm_head_bias": True},
}

# types whose mlx-lm ModelArgs require a top-level `rope_theta` (hub configs, written by transformers v4, have it)
TOP_ROPE_THETA = ("ernie4_5", "exaone4", "granite", "helium", "olmo3", "stablelm", "qwen3_moe", "qwen2_moe")
# v4 names mlx-lm reads that v5 renamed: v5 name -> v4 name, per type
V4_NAMES = {"qwen3_moe": {"num_local_experts": "num_experts"}, "qwen2_moe": {"num_local_experts": "num_experts"}}


# the types whose tiny parity configs predate the generic fill below (kept as they were)
LEGACY = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen3_moe",
          "qwen2_moe", "olmo2", "olmo3", "olmoe", "granite", "helium", "ernie4_5", "seed_oss", "internlm3", "exaone4",
          "hunyuan_v1_dense", "cohere", "starcoder2", "stablelm", "nemotron")


def tiny_config(model_type: str, **overrides) -> dict:
    """Config kwargs for a tiny random model of `model_type` (transformers' own config class decides
    which generic fields apply)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    cfg = dict(BASE)
    if model_type not in LEGACY:
        cfg.update({k: v for k, v in GENERIC.items() if _has(default, k)})
    cfg.update(TINY.get(model_type, {}))
    for alias, name in getattr(type(default), "attribute_map", {}).items():  # e.g. gpt_oss num_experts ->
        for given, other in ((alias, name), (name, alias)):  # num_local_experts: an override of either
            if given in overrides and other not in overrides:  # name wins over a default under the other
                cfg.pop(other, None)
    cfg.update(overrides)
    for sub, extra in (("text_config", {}), ("vision_config", VISION)):
        sc = getattr(default, sub, None)
        if sc is not None and not isinstance(sc, dict):
            vals = {**BASE, **GENERIC, "vocab_size": 96} if sub == "text_config" else extra
            cfg[sub] = {k: v for k, v in vals.items() if _has(sc, k)}
            cfg[sub].update(TINY.get(model_type, {}).get(sub, {}))
            cfg[sub].update(overrides.get(sub) or {})  # an override of a sub-config's fields wins too
    return cfg


def hub_style(model_type: str, cfg: dict, hf_config=None) -> dict:
    """Add the v4-style fields hub checkpoints of `model_type` carry (returns the changed dict).

    For the types outside `LEGACY`: every field mlx-lm's `ModelArgs` reads that config.json lacks is
    filled as a transformers-v4 config states it (v4 wrote every attribute of the config object):
    from the attribute of `hf_config` (computed values such as head_dim, full_attention_interval), and
    for fields mlx-lm requires also from `rope_parameters` (rope_theta, partial_rotary_factor,
    rope_scaling) and v4's names (`V4_ALIASES`).
    """
    if model_type not in LEGACY:
        for k, v in HUB_FIELDS.get(model_type, {}).items():  # before the fill: it may read them
            target = cfg.setdefault("text_config", {}) if k == "text_config" else None
            where = target if target is not None else cfg
            for kk, vv in (v.items() if target is not None else [(k, v)]):
                where.setdefault(kk, vv(where) if callable(vv) else vv)
        _v4_fill(model_type, cfg, hf_config)
        for k, m in V4_VALUES.get(model_type, {}).items():
            cfg[k] = [m.get(v, v) for v in cfg[k]] if isinstance(cfg.get(k), list) else cfg.get(k)
        return cfg
    if model_type == "gemma3_text":  # hub gemma3 configs carry it; mlx-lm reads it (default 6 > 2 layers)
        cfg.setdefault("sliding_window_pattern", TINY[model_type]["sliding_window_pattern"])
    if model_type in TOP_ROPE_THETA:
        rp = cfg.get("rope_parameters") or {}
        rp = rp.get("full_attention", rp)  # per-layer-type rope parameters (olmo3)
        cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if model_type == "stablelm":
            cfg.setdefault("partial_rotary_factor", rp.get("partial_rotary_factor", 0.25))
        if model_type == "exaone4":  # hub exaone4 configs: "sliding_window_pattern": "LLLG"
            cfg.setdefault("rope_scaling", None)
            cfg["sliding_window_pattern"] = "".join("G" if t == "full_attention" else "L" for t in cfg["layer_types"])
    for new, old in V4_NAMES.get(model_type, {}).items():
        cfg.setdefault(old, cfg.get(new))
    return cfg


# mlx-lm fields v4 configs stated as a period that v5 turns into layer_types (global layer every p-th)
PERIODS = ("sliding_window_pattern", "full_attention_interval")
# mlx-lm field -> the v4 config field (or rope_parameters key) it was written from
V4_ALIASES = {"n_ctx": "n_positions", "rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor",
              "block_dim": "hidden_size"}
# mlx-lm fields v4 configs stated that v5 keeps in another form: field -> value from the v5 config
V4_COMPUTED = {"is_moe_layer": lambda c: [t == "sparse" for t in c["mlp_layer_types"]] if "mlp_layer_types" in c else None}
# fields the type's hub configs carry (written by its original remote code) that transformers' own config class
# does not, with the value transformers' model class always computes with; mlx-lm requires them
HUB_FIELDS = {
    "apertus": {"mlp_bias": False, "qk_norm": True, "post_norm": False},
    "qwen3_vl_moe": {"text_config": {"norm_topk_prob": True}},  # Qwen3VLMoeTextTopKRouter always renormalises
    # GLM-5 (DSA): deepseek-v3 routing (sigmoid scores, correction bias), every layer past the dense ones MoE
    "glm_moe_dsa": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1},
    # MiniMax-M2: partial rope stated as rotary_dim (transformers' config still reads it), no shared expert
    "minimax_m2": {"shared_intermediate_size": 0,
                   "rotary_dim": lambda c: int(c["head_dim"] * c["rope_parameters"].get("partial_rotary_factor", 1.0))},
}
# Kimi-Linear: hub configs state the linear attention as linear_attn_config (1-indexed layer lists; mlx-lm reads only
# that), the dense layers as first_k_dense_replace, and mla_use_nope (transformers' KimiLinear has no rope)
HUB_FIELDS["kimi_linear"] = {
    "linear_attn_config": lambda c: {
        "kda_layers": [i + 1 for i, t in enumerate(c["layer_types"]) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(c["layer_types"]) if t == "full_attention"],
        "num_heads": c["linear_num_heads"], "head_dim": c["linear_head_dim"],
        "short_conv_kernel_size": c["linear_conv_kernel_dim"]},
    "first_k_dense_replace": lambda c: (c["mlp_layer_types"] + ["sparse"]).index("sparse"),
    "mla_use_nope": True}
# MiMo-V2-Flash: hub configs state its layer plan and attention in the original code's fields (mlx-lm reads only
# those); the values are what transformers' MiMoV2Flash computes with: sliding layers have twice the kv heads and
# sinks, full ones neither; routing is DeepSeek-V3's (sigmoid, correction bias); sliding_window is size + 1
_ROPE = lambda c, t: c["rope_parameters"][t]  # noqa: E731
HUB_FIELDS["mimo_v2_flash"] = {
    "hybrid_layer_pattern": lambda c: [int(t == "sliding_attention") for t in c["layer_types"]],
    "moe_layer_freq": lambda c: [int(t == "sparse") for t in c["mlp_layer_types"]],
    "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
    "sliding_window_size": lambda c: c["sliding_window"] - 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_shared_experts": None,
    "layernorm_epsilon": lambda c: c["rms_norm_eps"],
    "rope_theta": lambda c: _ROPE(c, "full_attention")["rope_theta"],
    "swa_rope_theta": lambda c: _ROPE(c, "sliding_attention")["rope_theta"],
    "partial_rotary_factor": lambda c: _ROPE(c, "full_attention").get("partial_rotary_factor", 1.0),
    "swa_num_attention_heads": lambda c: c["num_attention_heads"],
    "swa_num_key_value_heads": lambda c: 2 * c["num_key_value_heads"],
    "swa_head_dim": lambda c: c["head_dim"], "swa_v_head_dim": lambda c: c["v_head_dim"]}
# LongCat-Flash: fields of the original code mlx-lm requires, as transformers' LongcatFlash always computes: MLA
# with both low-rank scales, zero experts that pass the input through
HUB_FIELDS["longcat_flash"] = {"attention_method": "MLA", "zero_expert_type": "identity", "mla_scale_q_lora": True,
                               "mla_scale_kv_lora": True}
# Gemma 4: hub configs state the global layers' head_dim and kv heads as global_head_dim (mlx-lm reads it, default
# 512) and num_global_key_value_heads; transformers 5 moves both into per_layer_config
_GEMMA4 = {"global_head_dim": lambda c: next(iter(c["per_layer_config"].values()))["head_dim"],
           "num_global_key_value_heads": lambda c: next(iter(c["per_layer_config"].values())).get("num_key_value_heads")}
HUB_FIELDS.update({"gemma4_text": _GEMMA4, "gemma4": {"text_config": _GEMMA4}, "gemma4_unified": {"text_config": _GEMMA4}})
# v5 values v4 configs spelled differently, per type: field -> {v5 value: v4 value}
V4_VALUES = {"granitemoehybrid": {"layer_types": {"linear_attention": "mamba", "full_attention": "attention"}}}


def mlx_text_args(model_type: str):
    """The ModelArgs class mlx-lm reads a multimodal config's `text_config` with (its TextArgs, or the
    ModelArgs of the module it wraps: gemma3 -> gemma3_text), or None."""
    import sys
    import types

    from mlx_lm.utils import _get_classes

    model_cls, _ = _get_classes({"model_type": model_type})
    for mod in [sys.modules[c.__module__] for c in model_cls.__mro__ if c.__module__.startswith("mlx_lm.models")]:
        names = [n for n in ("TextArgs", "TextConfig", "TextModelArgs") if hasattr(mod, n)]
        text_cls = getattr(mod, names[0]) if names else next(  # a wrapper around another module (gemma3)
            (m.ModelArgs for m in map(lambda n: getattr(mod, n), dir(mod)) if isinstance(m, types.ModuleType)
             and m.__name__.startswith("mlx_lm.models.") and hasattr(m, "ModelArgs")), None)
        if text_cls is not None:
            return text_cls
    return None


def _v4_fill(model_type: str, cfg: dict, hf_config) -> None:
    import dataclasses

    try:
        from mlx_lm.utils import _get_classes
    except ImportError:  # no mlx-lm here (a GPU box with the deploy extra): nothing reads the config with it
        return

    _, args_cls = _get_classes({"model_type": model_type})
    jobs = [(args_cls, cfg, hf_config)]
    text_cls = mlx_text_args(model_type)
    if text_cls is not None and isinstance(cfg.get("text_config"), dict):
        jobs.append((text_cls, cfg["text_config"], getattr(hf_config, "text_config", None)))
    for cls, target, obj in jobs:
        rp = target.get("rope_parameters") or {}
        rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
        for f in dataclasses.fields(cls):
            if target.get(f.name) is not None:
                continue
            if f.name in PERIODS and "full_attention" in (target.get("layer_types") or []):
                target[f.name] = target["layer_types"].index("full_attention") + 1
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name == "rope_scaling" and rp.get("rope_type", "default") != "default":
                target[f.name] = rp  # v4 wrote a non-default rope as rope_scaling
                continue
            if not required and (obj is None or _attr(obj, f.name) is None):
                continue  # a default mlx-lm field is filled only where transformers v4 wrote it out
            name = V4_ALIASES.get(f.name, f.name)
            if f.name in V4_COMPUTED and V4_COMPUTED[f.name](target) is not None:
                target[f.name] = V4_COMPUTED[f.name](target)
                continue
            if f.name == "rope_scaling":
                v = rp if rp and rp.get("rope_type", "default") != "default" else None
            elif name in rp:
                v = rp[name]
            elif target.get(name) is not None:
                v = target[name]
            elif target is not cfg and cfg.get(name) is not None:  # a wrapper's field its text model reads
                v = cfg[name]
            elif obj is not None and _attr(obj, f.name) is not None:
                v = _attr(obj, f.name)
            elif f.name == "head_dim" and target.get("hidden_size"):  # v4 wrote the computed value
                v = target["hidden_size"] // target["num_attention_heads"]
            else:
                continue
            try:
                json.dumps(v)
            except TypeError:
                continue
            target[f.name] = v


def _has(obj, name) -> bool:
    """hasattr that counts a per-layer attribute (gemma4's head_dim, which transformers refuses to read
    globally) as present."""
    try:
        getattr(obj, name)
        return True
    except AttributeError:
        return False
    except Exception:
        return True


def _attr(obj, name):
    if isinstance(getattr(type(obj), name, None), property):
        return None  # computed by the config class, not a field a config.json states
    try:
        return getattr(obj, name, None)
    except Exception:  # per-layer attributes transformers refuses to read globally
        return None
