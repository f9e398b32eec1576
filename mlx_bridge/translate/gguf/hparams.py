"""GGUF metadata of an arch: which model types llama.cpp can run as MLX computed them, and their hparams.

After convert_hf_to_gguf's `TextModel.set_gguf_parameters` and each arch class's additions, read from
the effective config (the values MLX computed with) and the arch's data in archs.py.

Example:
    >>> check_arch("llama", {}, "config.json").arch.name
    'LLAMA'
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np

from ...errors import BridgeError, raise_all
from . import plain_configs
from .archs import GGUF_ARCHS, GgufArch, refusal
from .recurrent import add_falcon_h1_hparams, add_gdn, add_mamba_hparams, add_ssm2, lfm2_ff, mamba_eps, mrope_sections

ROPE_TYPES = ("default", "linear", "llama3")


_EXPERT_ALIASES = {"num_experts": ("num_local_experts", "n_routed_experts", "moe_num_experts"),
                   "num_experts_per_tok": ("num_experts_per_token", "top_k_experts", "moe_k")}


_RESOLVED = plain_configs.RESOLVED


def gguf_config(cfg: dict) -> dict:
    """`cfg` with what llama.cpp's converter reads, resolved by transformers' own config class: the
    standard names (num_hidden_layers, ...) filled from its aliases (`attribute_map`, e.g. GPT-2's
    n_layer), GPT-2-style n_inner (else 4 x hidden), and the rotary fraction the class computes with.

    A type whose class only renames keys (derived data, `plain_configs`) is resolved without importing
    transformers and torch (about 3 CPU seconds).

    Example:
        >>> gguf_config({"model_type": "gpt2", "n_layer": 2, "n_embd": 64})["num_hidden_layers"]
        2
    """
    out = plain_configs.resolve(cfg)
    if out is None:
        out = _by_transformers(cfg)
    for std, aliases in _EXPERT_ALIASES.items():  # TextModel.set_gguf_parameters' find_hparam lists
        if out.get(std) is None:
            out[std] = next((out[a] for a in aliases if out.get(a) is not None), None)
    return out


def _by_transformers(cfg: dict) -> dict:
    from transformers import AutoConfig

    try:
        conf = AutoConfig.for_model(**cfg)
    except Exception:  # noqa: BLE001 - e.g. Mamba2's time_step_limit holding transformers' JSON form of infinity
        conf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if "__float__" not in json.dumps(v)})
    out = dict(cfg)
    for std, alias in conf.attribute_map.items():
        if out.get(std) is None and out.get(alias) is not None:
            out[std] = out[alias]
    if hasattr(conf, "n_inner"):  # GPT-2 style: the MLP is n_inner wide, else 4 x hidden
        out["intermediate_size"] = conf.n_inner or 4 * out["hidden_size"]
    for key in _RESOLVED:  # values the config class fills in when config.json leaves them out
        if out.get(key) is None and getattr(conf, key, None) is not None:
            out[key] = getattr(conf, key)
    mlp_types = getattr(conf, "mlp_layer_types", None)  # Glm4MoeLiteConfig: ["dense", "sparse", ...]
    if out.get("first_k_dense_replace") is None and mlp_types:
        out["first_k_dense_replace"] = next((i for i, t in enumerate(mlp_types) if t != "dense"), len(mlp_types))
        out["mlp_layer_types"] = list(mlp_types)
    rp = getattr(conf, "rope_parameters", None) or {}
    frac = rp.get("partial_rotary_factor") or getattr(conf, "partial_rotary_factor", None) or getattr(conf, "rotary_pct", None)
    if frac is not None:
        out["partial_rotary_factor"] = frac
    return out


def kv_heads(cfg: dict, ga: GgufArch) -> int | list[int]:
    """Key/value heads as llama.cpp must count them for this arch."""
    n_head = cfg["num_attention_heads"]
    if ga.mla:  # DeepseekV2Model: MLA runs as MQA over the latent
        return 1
    if ga.layer_kinds:  # a hybrid (LFM2Model, GraniteHybridModel, NemotronHModel): kv heads on attention layers only
        n_kv = cfg.get("num_key_value_heads") or n_head
        return [n_kv if k == "attention" else 0 for k in layer_kinds(cfg, ga)]
    if ga.kv_heads == "mha":
        return n_head
    if ga.kv_heads == "multi_query":
        return 1 if cfg.get("multi_query", True) else n_head
    return cfg.get("num_key_value_heads") or n_head


def layer_kinds(cfg: dict, ga: GgufArch) -> list[str]:
    """Each layer's kind ("attention", "ssm", ...) of a hybrid, from hybrid_override_pattern (NemotronH) or the layer
    types (as mlx-lm reads them)."""
    types = cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type") or cfg.get("layer_types") or []
    return [ga.layer_kinds.get(t, t) for t in types]


def text_arch(model_type: str, cfg: dict, where: str) -> tuple[str, dict, GgufArch | None]:
    """A multimodal wrapper's language model: (its model_type, its config, its GGUF data); others as given.

    Example:
        >>> text_arch("mistral3", {"text_config": {"model_type": "mistral"}}, "config.json")[0]
        'mistral'
    """
    ga = GGUF_ARCHS.get(model_type)
    if ga is None or not ga.text:
        return model_type, cfg, ga
    tc = cfg.get("text_config") or {}
    inner = ga.text.get(tc.get("model_type"))
    if inner is None:
        raise BridgeError(f"{where}: text_config.model_type {tc.get('model_type')!r}: llama.cpp's {ga.arch.name.lower()} "
                          f"text model is written only for {', '.join(ga.text)}")
    return tc["model_type"], tc, inner


def check_arch(model_type: str, cfg: dict, where: str, ga: GgufArch | None = None) -> GgufArch:
    """The arch's GGUF data; BridgeError when llama.cpp can't compute what MLX computed."""
    ga = ga or GGUF_ARCHS.get(model_type)
    if ga is None:
        raise BridgeError(f"{where}: model_type {model_type!r} has no GGUF export: {refusal(model_type)}")
    problems = [f"{where}: {k}={cfg.get(k)!r}, but llama.cpp's {ga.arch.name.lower()} computes as if {k}={v!r}"
                for k, v in ga.requires.items() if cfg.get(k, v) != v]
    rp = cfg.get("rope_parameters") or {}
    rope_type = rp.get("rope_type") or "default"
    if (rope_type not in ROPE_TYPES or (rope_type == "llama3" and not ga.llama_extras)) and rope_type not in ga.rope_types:
        problems.append(f"{where}: rope_type {rope_type!r} is not written to GGUF for {model_type}")
    if rope_type == "longrope" and longrope_scale(cfg) != 1.0:
        problems.append(f"{where}: longrope scales q/k by {longrope_scale(cfg):.4g} in MLX (max_position_embeddings "
                        f"{cfg.get('max_position_embeddings')} over the original), but llama.cpp's "
                        f"{ga.arch.name.lower()} does not scale them")
    if ga.query_scale_head_dim and cfg.get("query_pre_attn_scalar") not in (None, cfg.get("head_dim")):
        problems.append(f"{where}: query_pre_attn_scalar={cfg['query_pre_attn_scalar']} but llama.cpp's "
                        f"{ga.arch.name.lower()} scales queries by 1/sqrt(head_dim={cfg.get('head_dim')})")
    n_layer = cfg.get("num_hidden_layers")
    if ga.swa_layer_counts and n_layer not in ga.swa_layer_counts and cfg.get("sliding_window") is not None:
        problems.append(f"{where}: sliding_window={cfg['sliding_window']} with {n_layer} layers, but llama.cpp's "
                        f"{ga.arch.name.lower()} windows attention (and skips rope on global layers) only with "
                        f"{' or '.join(map(str, ga.swa_layer_counts))} layers")
    if ga.mla and "add_expert_group_count" not in ga.extra and (cfg.get("n_group") or 1) > 1 \
            and cfg.get("topk_method") == "group_limited_greedy":
        problems.append(f"{where}: topk_method='group_limited_greedy' with n_group={cfg['n_group']}, but llama.cpp's "
                        f"{ga.arch.name.lower()} picks expert groups by their top-2 score sum, {model_type} by their max")
    if ga.gdn:
        step = cfg.get("full_attention_interval") or 4
        want = ["linear_attention" if (i + 1) % step else "full_attention" for i in range(n_layer)]
        if cfg.get("layer_types") is not None and list(cfg["layer_types"]) != want:
            problems.append(f"{where}: layer_types={cfg['layer_types']}, but llama.cpp's {ga.arch.name.lower()} attends "
                            f"fully on every {step}th layer ({want})")
        rot = int((cfg.get("partial_rotary_factor") or 1.0) * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
        if ga.mrope and sum(mrope_sections(cfg)) > rot // 2:
            problems.append(f"{where}: M-RoPE sections {mrope_sections(cfg)} cover more than the {rot // 2} rotary "
                            f"frequencies, which llama.cpp's {ga.arch.name.lower()} refuses")
        if cfg.get("rms_norm_eps", 1e-6) != 1e-6:  # transformers' and mlx-lm's gated delta net: l2 norm eps 1e-6
            problems.append(f"{where}: rms_norm_eps={cfg['rms_norm_eps']}, but llama.cpp's {ga.arch.name.lower()} also "
                            f"l2-normalises the gated delta net's q/k with it (the model with 1e-6)")
        if cfg.get("linear_key_head_dim") != cfg.get("linear_value_head_dim"):
            problems.append(f"{where}: linear_key_head_dim={cfg.get('linear_key_head_dim')} != linear_value_head_dim="
                            f"{cfg.get('linear_value_head_dim')}, but llama.cpp's {ga.arch.name.lower()} sizes both by one")
    k, mlp_types = cfg.get("first_k_dense_replace") or 0, cfg.get("mlp_layer_types")
    if ga.mla and mlp_types and list(mlp_types) != ["dense"] * k + ["sparse"] * (len(mlp_types) - k):
        problems.append(f"{where}: mlp_layer_types={mlp_types}, but llama.cpp's {ga.arch.name.lower()} runs "
                        f"dense layers only before the first sparse one")
    if ga.eps_also and cfg.get(ga.eps_also) != mamba_eps(cfg):
        problems.append(f"{where}: {ga.eps_also}={cfg.get(ga.eps_also)} differs from the norms' epsilon "
                        f"{mamba_eps(cfg)}, but llama.cpp's {ga.arch.name.lower()} uses one epsilon for both")
    if ga.no_rope_step:  # SmolLM3Config: no_rope_layers[i] = 1 where rope is used
        want = [int((i + 1) % ga.no_rope_step != 0) for i in range(n_layer)]
        step = cfg.get("no_rope_layer_interval") or ga.no_rope_step
        got = cfg.get("no_rope_layers") or [int((i + 1) % step != 0) for i in range(n_layer)]
        if list(got) != want:
            problems.append(f"{where}: no_rope_layers={got}, but llama.cpp's {ga.arch.name.lower()} skips rope on "
                            f"every {ga.no_rope_step}th layer ({want})")
        elif ga.needs_no_rope_layer and all(want):
            problems.append(f"{where}: {n_layer} layers, none without rope, but llama.cpp's {ga.arch.name.lower()} "
                            f"aborts on a model without a no-rope layer (fewer than {ga.no_rope_step} layers)")
    if ga.imrope and "mrope_section" not in rp:
        problems.append(f"{where}: rope_parameters has no mrope_section, which llama.cpp's {ga.arch.name.lower()} needs")
    elif ga.imrope and (drift := imrope_drift(cfg)) and drift[1] * IMROPE_CONTEXT > IMROPE_MAX_ANGLE:
        problems.append(f"{where}: M-RoPE sections {rp['mrope_section']} leave rotary pairs {drift[0]} (of "
                        f"{rotary_dim(cfg) // 2}) to llama.cpp's 4th section, which it rotates by position 0 on text "
                        f"(MLX: by the position, up to {drift[1]:.3g} rad a token)")
    kinds = cfg.get("indexer_types") or []
    if ga.indexer and (set(kinds) - {"full"} or (cfg.get("max_position_embeddings") or 0) >= 2**20):
        problems.append(f"{where}: indexer_types={kinds} with {cfg.get('max_position_embeddings')} positions, but the gguf "
                        f"package cannot write llama.cpp's indexer types, and llama.cpp's {ga.arch.name.lower()} assumes "
                        f"every indexer full only below 2^20 positions")
    want = ["full_attention" if (i + 1) % ga.swa_step == 0 else "sliding_attention" for i in range(n_layer)] if ga.swa_step else []
    if want and list(cfg.get("layer_types") or []) != want:
        problems.append(f"{where}: layer_types={cfg.get('layer_types')}, but llama.cpp's {ga.arch.name.lower()} windows and "
                        f"ropes every layer but each {ga.swa_step}th ({want})")
    if ga.rope_on_swa and "sliding_attention" not in (cfg.get("layer_types") or []):
        problems.append(f"{where}: no layer is windowed (layer_types), so MLX ropes every layer, but llama.cpp's "
                        f"{ga.arch.name.lower()} ropes only windowed layers")
    last = cfg.get(ga.last_moe) if ga.last_moe else None
    if last is not None and max(last if isinstance(last, list) else [last]) != n_layer - 1:
        problems.append(f"{where}: {ga.last_moe}={last}, but llama.cpp's {ga.arch.name.lower()} runs experts up to the "
                        f"last layer ({n_layer - 1})")
    n_kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    if ga.no_gqa and n_kv != cfg.get("num_attention_heads"):
        problems.append(f"{where}: num_key_value_heads={n_kv} but llama.cpp's {ga.arch.name.lower()} needs as many "
                        f"key/value heads as query heads ({cfg.get('num_attention_heads')})")
    if ga.h1 and cfg.get("mamba_rms_norm") and cfg.get("mamba_norm_before_gate"):
        problems.append(f"{where}: mamba_norm_before_gate=True, but llama.cpp's {ga.arch.name.lower()} gates the Mamba2 "
                        f"output before its grouped norm")
    if ga.h1 and cfg.get("tie_word_embeddings") and cfg.get("lm_head_multiplier") != cfg.get("embedding_multiplier"):
        problems.append(f"{where}: tied embeddings with lm_head_multiplier={cfg.get('lm_head_multiplier')} != "
                        f"embedding_multiplier={cfg.get('embedding_multiplier')}, but llama.cpp's "
                        f"{ga.arch.name.lower()} reads the output as the (scaled) embedding")
    if "moe" in layer_kinds(cfg, ga):
        problems.append(f"{where}: 'moe' layers: llama.cpp converts this config as {ga.arch.name.lower()}_moe, which "
                        f"mlx-bridge does not write yet")
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if ga.kq_norm_unless_experts and bool(cfg.get("use_qk_norm")) != (n_exp != ga.kq_norm_unless_experts):
        problems.append(f"{where}: use_qk_norm={cfg.get('use_qk_norm')} with {n_exp} experts, but llama.cpp's "
                        f"{ga.arch.name.lower()} normalises q/k exactly when there are not {ga.kq_norm_unless_experts}")
    raise_all(problems)
    return ga


def longrope_scale(cfg: dict) -> float:
    """The factor mlx-lm's SuScaledRoPE multiplies q/k by: long_mscale, else sqrt(1 + ln f / ln original) when the
    context f = max / original positions is longer than the original (1 otherwise)."""
    rp = cfg.get("rope_parameters") or {}
    orig = rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    f = (cfg.get("max_position_embeddings") or orig) / orig
    return rp.get("long_mscale") or (1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig)))


def expert_count(cfg: dict, ga: GgufArch) -> int:
    """The `expert_count` key the file carries (0: none), which llama.cpp's quantizer reads to pick types.

    Example:
        >>> [expert_count({"num_local_experts": 4}, GGUF_ARCHS[t]) for t in ("mixtral", "nemotron_h")]
        [4, 0]
    """
    if ga.ff_per_layer:  # NemotronH: experts only with "moe" layers (check_arch refuses them)
        return 0
    return cfg.get("num_local_experts") or cfg.get("num_experts") or 0


def add_hparams(w: gguf.GGUFWriter, cfg: dict, ga: GgufArch, n_vocab: int) -> None:
    """TextModel.set_gguf_parameters (+ LlamaModel's, + the arch's extras) from the effective config."""
    if ga.ssm:
        return add_mamba_hparams(w, cfg, ga)
    if ga.h1:
        return add_falcon_h1_hparams(w, cfg, n_vocab)
    n_head = cfg["num_attention_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    ctx = cfg.get("max_position_embeddings")
    if ga.arch == gguf.MODEL_ARCH.GRANITE_HYBRID and cfg.get("position_embedding_type") != "rope":  # add_ssm2
        ctx = 2**20
    if ctx is not None:
        w.add_context_length(ctx)
    w.add_embedding_length(cfg["hidden_size"])
    ff = lfm2_ff(cfg) if ga.shortconv else cfg.get(ga.ffn_key)
    if ga.ff_per_layer:  # NemotronHModel: the MLP width on mlp layers, 0 on the others
        ff = [ff if k == "mlp" else 0 for k in layer_kinds(cfg, ga)]
    if ff is not None:  # TextModel: optional (Qwen3.5-MoE has experts only)
        w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(kv_heads(cfg, ga))
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if rp.get("rope_type") == "yarn":  # TextModel.set_gguf_parameters' yarn branch
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        for method, key in (("add_rope_scaling_yarn_ext_factor", "extrapolation_factor"),
                            ("add_rope_scaling_yarn_attn_factor", "attention_factor"),
                            ("add_rope_scaling_yarn_beta_fast", "beta_fast"), ("add_rope_scaling_yarn_beta_slow", "beta_slow")):
            if rp.get(key) is not None:
                getattr(w, method)(float(rp[key]))
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    w.add_layer_norm_rms_eps(cfg.get(ga.eps_key, 1e-6))
    ln_eps = next((cfg[k] for k in ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon") if cfg.get(k) is not None), None)
    if ln_eps is not None:
        w.add_layer_norm_eps(ln_eps)
    n_exp = expert_count(cfg, ga)
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    head_dim = cfg.get("head_dim")
    if ga.mla:
        add_mla(w, cfg, n_vocab)
    elif ga.lora_attn:  # MiniCPM3Model.set_gguf_parameters
        w.add_key_length(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
        w.add_vocab_size(n_vocab)
    elif head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if ga.llama_extras:
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(head_dim or cfg["hidden_size"] // n_head)
    if ga.partial_rope:
        f = cfg.get("partial_rotary_factor", 1.0)  # as gguf_config resolved it
        w.add_rope_dimension_count(int(f * (head_dim or cfg["hidden_size"] // n_head)))
    if ga.arch in (gguf.MODEL_ARCH.PHI3, gguf.MODEL_ARCH.PHIMOE):  # Phi3MiniModel: rope over the whole head, no window unless set
        w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // n_head)
        w.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings") or ctx)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    score = cfg.get("scoring_func")
    if score in ("sigmoid", "softmax") and "add_expert_gating_func" not in ga.consts:
        w.add_expert_gating_func(getattr(gguf.ExpertGatingFuncType, score.upper()))
    for method, value in ga.consts.items():
        getattr(w, method)(value)
    for method, key in ga.extra.items():  # "rope_parameters.x": x inside rope_parameters
        value = rp.get(key.split(".", 1)[1]) if key.startswith("rope_parameters.") else cfg.get(key)
        if value is not None:
            getattr(w, method)(value)
    if ga.shared_ffn and cfg.get(ga.shared_ffn):  # (Ernie4_5MoeModel writes intermediate_size // kv heads: the same
        w.add_expert_shared_feed_forward_length(cfg["moe_intermediate_size"] * cfg[ga.shared_ffn])  # for ERNIE-4.5)
    if ga.gdn:
        add_gdn(w, cfg, ga)
    elif ga.mrope and "mrope_section" in rp:  # TextModel: the sections when the config has them
        w.add_rope_dimension_sections(mrope_sections(cfg))
    if ga.ssm2_keys:
        add_ssm2(w, cfg, ga)
    if ga.shortconv:  # LFM2Model.set_gguf_parameters
        w.add_vocab_size(n_vocab)
        w.add_shortconv_l_cache(cfg["conv_L_cache"])
    if ga.sliding_window_full:  # mlx-lm attends to the whole context in every layer
        w.add_sliding_window(ctx)
    if ga.sliding_layers:  # the window on exactly the layers mlx-lm windows (effective config's layer_types)
        types = cfg.get("layer_types") or []
        if any(t == "sliding_attention" for t in types):
            w.add_sliding_window(cfg["sliding_window"])
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


# An interleaved M-RoPE model whose uncovered pairs turn by at most this angle over this many positions is written
# (with a warning) as llama.cpp's own converter writes it: real Qwen3-VL ([24, 20, 20] of 64 pairs, theta 5e6) turns
# its pairs 61 and 62 by 4.1e-7 rad a token, 0.0135 rad at position 32768.
IMROPE_CONTEXT, IMROPE_MAX_ANGLE = 32768, 0.02


def rotary_dim(cfg: dict) -> int:
    """The rotated part of a head: partial_rotary_factor x head_dim."""
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return int((cfg.get("partial_rotary_factor") or 1.0) * head)


def imrope_drift(cfg: dict) -> tuple[list[int], float] | None:
    """(the rotary pairs llama.cpp's interleaved M-RoPE leaves unrotated on text, the fastest one's angle a token in
    MLX), or None when the sections cover every pair.

    Example:
        >>> pairs, rate = imrope_drift({"head_dim": 128, "rope_parameters": {"rope_theta": 5e6, "mrope_section": [24, 20, 20]}})
        >>> pairs, round(rate * 1e7, 2)
        ([61, 62], 4.12)
    """
    rot = rotary_dim(cfg)
    uncovered = imrope_uncovered(mrope_sections(cfg), rot // 2)
    if not uncovered:
        return None
    theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return uncovered, max(theta ** (-2 * s / rot) for s in uncovered)


def arch_warnings(cfg: dict, ga: GgufArch) -> list[str]:
    """What llama.cpp computes slightly otherwise than MLX on configs `check_arch` lets through."""
    drift = imrope_drift(cfg) if ga.imrope else None
    if not drift:
        return []
    return [f"M-RoPE sections {mrope_sections(cfg)[:3]} leave rotary pairs {drift[0]} (of {rotary_dim(cfg) // 2}) "
            f"unrotated on text in llama.cpp (as its own converter writes this model); MLX turns them by at most "
            f"{drift[1]:.2g} rad a token ({drift[1] * IMROPE_CONTEXT:.2g} rad at position {IMROPE_CONTEXT})"]


def imrope_uncovered(sections: list[int], half: int) -> list[int]:
    """The rotary pairs interleaved M-RoPE (ggml's IMROPE: pair s -> section s % 3 while s < 3 x that section's
    size) gives to the 4th section, which llama.cpp sets to 0 for text tokens.

    Example:
        >>> imrope_uncovered([24, 20, 20], 64), imrope_uncovered([3, 3, 2], 8)
        ([61, 62], [])
    """
    return [s for s in range(half) if s >= 3 * sections[s % 3]]


def add_mla(w: gguf.GGUFWriter, cfg: dict, n_vocab: int) -> None:
    """DeepseekV2Model.set_gguf_parameters' MLA lengths: llama.cpp runs MLA as MQA over the latent (k = latent + rope
    part, v = latent), then decompresses to the heads' own lengths (the *_mla keys)."""
    rank, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(rope)
    for method, key in (("add_leading_dense_block_count", "first_k_dense_replace"), ("add_expert_shared_count", "n_shared_experts")):
        if cfg.get(key) is None:  # required by llama.cpp; the arch's `extra` writes it when set
            getattr(w, method)(0)
    mscale_all = (cfg.get("rope_parameters") or {}).get("mscale_all_dim")
    if mscale_all is not None:  # llama.cpp divides this by 0.1 again ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """rope_freqs.weight for rope_type llama3 (convert_hf_to_gguf LlamaModel.generate_extra_tensors)."""
    rp = cfg["rope_parameters"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (float(rp.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
