"""GGUF hparams of the recurrent layers: Mamba and Mamba2 (alone, in Granite/Nemotron hybrids, beside attention in
Falcon-H1), gated delta nets (Qwen3-Next, Qwen3.5) and LFM2's short convolutions, after convert_hf_to_gguf's classes.

Example:
    >>> lfm2_ff({"intermediate_size": 12288, "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0,
    ...          "block_multiple_of": 256})
    8192
"""

from __future__ import annotations

import gguf

from .archs import GgufArch


def add_ssm2(w: gguf.GGUFWriter, cfg: dict, ga: GgufArch) -> None:
    """GraniteHybridModel.set_gguf_parameters' Mamba2 hparams (from the arch's config keys); Granite: rope on or off
    as the (effective) config's position_embedding_type says (without rope, a context as a state space model's)."""
    k = ga.ssm2_keys
    w.add_ssm_conv_kernel(cfg[k["conv"]])
    w.add_ssm_state_size(cfg[k["state"]])
    w.add_ssm_group_count(cfg[k["groups"]])
    w.add_ssm_inner_size(cfg[k["inner"][0]] * cfg[k["inner"][1]])
    w.add_ssm_time_step_rank(cfg[k["heads"]])
    if ga.arch == gguf.MODEL_ARCH.GRANITE_HYBRID:
        w.add_rope_scaling_finetuned(cfg.get("position_embedding_type") == "rope")


def add_falcon_h1_hparams(w: gguf.GGUFWriter, cfg: dict, n_vocab: int) -> None:
    """FalconH1Model.set_gguf_parameters: Mamba2Model's (mamba_-prefixed keys), then the attention's."""
    head_dim = cfg.get("mamba_d_head") or 64
    w.add_embedding_length(cfg["hidden_size"])
    w.add_ssm_conv_kernel(cfg.get("mamba_d_conv") or 4)
    w.add_ssm_inner_size(cfg["mamba_d_ssm"])
    w.add_ssm_state_size(cfg.get("mamba_d_state") or 128)
    w.add_ssm_time_step_rank(cfg["mamba_d_ssm"] // head_dim)
    w.add_ssm_group_count(cfg.get("mamba_n_groups") or 1)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps") or 1e-5)
    w.add_vocab_size(n_vocab)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 0))
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))))


def lfm2_ff(cfg: dict) -> int:
    """LFM2Model._add_feed_forward_length: the MLP width LFM2 computes from block_ff_dim (auto-adjusted: 2/3 of it,
    times the multiplier, rounded up to block_multiple_of)."""
    ff = cfg.get("block_ff_dim") or cfg["intermediate_size"]
    if cfg.get("block_auto_adjust_ff_dim"):
        ff = int(2 * ff / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            ff = int(cfg["block_ffn_dim_multiplier"] * ff)
        m = cfg["block_multiple_of"]
        ff = m * ((ff + m - 1) // m)
    return ff


def add_gdn(w: gguf.GGUFWriter, cfg: dict, ga: GgufArch) -> None:
    """Qwen3NextModel.set_gguf_parameters (+ _Qwen35MRopeMixin): the gated delta net's sizes, the full-attention
    interval (check_arch: layer_types follow it), and the M-RoPE sections (text: every section sees one position)."""
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(cfg.get("full_attention_interval") or 4)
    if ga.mrope:
        w.add_rope_dimension_sections(mrope_sections(cfg))


def mrope_sections(cfg: dict) -> list[int]:
    """The M-RoPE sections as _Qwen35MRopeMixin writes them (its default when the config has none), 4 long."""
    sections = list((cfg.get("rope_parameters") or {}).get("mrope_section") or [11, 11, 10, 0])
    return sections + [0] * (4 - len(sections))


def mamba_eps(cfg: dict) -> float:
    return cfg.get("layer_norm_epsilon") or cfg.get("rms_norm_eps") or 1e-5


def add_mamba_hparams(w: gguf.GGUFWriter, cfg: dict, ga: GgufArch) -> None:
    """convert_hf_to_gguf's MambaModel.set_gguf_parameters (MambaConfig's names, resolved by gguf_config)."""
    d_model = cfg["hidden_size"]
    w.add_context_length(2**20)  # as llama.cpp's converter: a state space model has no trained context
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_ssm_conv_kernel(cfg.get("conv_kernel") or 4)
    if ga.arch == gguf.MODEL_ARCH.MAMBA2:  # Mamba2Model: d_inner = heads x head_dim, one time step per head
        d_inner = cfg["num_heads"] * cfg["head_dim"]
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(cfg.get("state_size") or 128)
        w.add_ssm_time_step_rank(cfg["num_heads"])
        w.add_ssm_group_count(cfg.get("n_groups") or 1)
    else:
        w.add_ssm_inner_size(cfg.get("intermediate_size") or 2 * d_model)
        w.add_ssm_state_size(cfg.get("state_size") or 16)
        w.add_ssm_time_step_rank(cfg.get("time_step_rank") or -(d_model // -16))
    w.add_layer_norm_rms_eps(mamba_eps(cfg))
    w.add_ssm_dt_b_c_rms(ga.arch == gguf.MODEL_ARCH.MAMBA and cfg["model_type"] == "falcon_mamba")
