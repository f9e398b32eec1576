"""Per-architecture GGUF data, keyed by Hugging Face `model_type` (after convert_hf_to_gguf.py).

What llama.cpp needs beyond the HF tensors: its architecture name, the row permutation of q/k for
llama-style rope (`LlamaModel.permute`), norms stored as `1 + w` (Gemma), other layout ops (GPT-2's
Conv1D, GPT-NeoX's fused qkv, Mamba's A), the hyperparameters each arch reads, and the config values
without which llama.cpp's graph computes something else. Tensor names are never typed here:
`gguf.get_tensor_name_map` maps the HF names, and stacked experts use the merged HF name
convert_hf_to_gguf builds before mapping. Which HF class llama.cpp converts as which arch is read from
llama.cpp itself (`llama_cpp_archs.json`, scripts/derive_gguf_archs.py); a test checks every entry here.

Example:
    >>> GGUF_ARCHS["mixtral"].arch.name, GGUF_ARCHS["mixtral"].permute_qk
    ('LLAMA', True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import gguf


@dataclass(frozen=True)
class GgufArch:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # HF rotate-half q/k rows -> llama.cpp's interleaved rope order
    norm_shift: float = 0.0  # added to every "*norm.weight" (Gemma's RMSNorm multiplies by 1 + w)
    llama_extras: bool = False  # LlamaModel.set_gguf_parameters: vocab_size and rope dimension count
    # GGUFWriter method -> config key, written when the key is present (per-arch hparams)
    extra: dict[str, str] = field(default_factory=dict)
    # config keys that must hold this value for llama.cpp's graph to compute what MLX computed
    requires: dict[str, object] = field(default_factory=dict)
    sliding_window_full: bool = False  # llama.cpp windows this arch's attention; MLX does not: window = context
    sliding_layers: bool = False  # MLX windows the `layer_types` "sliding_attention" layers: write window + pattern
    query_scale_head_dim: bool = False  # llama.cpp scales queries by 1/sqrt(head_dim), MLX by query_pre_attn_scalar
    partial_rope: bool = False  # rope over partial_rotary_factor (or rotary_pct) of each head: write the dimension count
    # HF tensor name suffix -> layout op (tensors.OPS): "transpose" (GPT-2's Conv1D), "qkv_by_kind" (GPT-NeoX's
    # per-head [q k v] rows -> all q rows, all k rows, all v rows), "neg_exp" and "squeeze" (Mamba)
    ops: dict[str, str] = field(default_factory=dict)
    # HF tensor name suffix -> the two llama.cpp tensors its halves (rows, axis -2) become (GraniteMoe's input_linear)
    halves: dict[str, tuple[gguf.MODEL_TENSOR, gguf.MODEL_TENSOR]] = field(default_factory=dict)
    consts: dict[str, object] = field(default_factory=dict)  # GGUFWriter method -> the value llama.cpp's converter writes
    kv_heads: str = "gqa"  # "gqa": num_key_value_heads; "mha": as many as the heads; "multi_query": 1 if multi_query
    swa_layer_counts: tuple[int, ...] = ()  # llama.cpp windows attention only at these layer counts (else none)
    no_rope_step: int = 0  # llama.cpp skips rope on every n-th layer (a fixed step): the config must agree
    rope_types: tuple[str, ...] = ()  # rope_parameters.rope_type values written for this arch beyond default/linear/llama3
    ssm: bool = False  # a Mamba state space model: MambaModel's hparams, no attention
    eps_also: str = ""  # a config key whose epsilon llama.cpp takes from the norms' (FalconMamba's mixer_rms_eps)
    no_gqa: bool = False  # llama.cpp sizes k/v (or k_norm) by the query heads: num_key_value_heads must equal them
    # a multimodal wrapper: text_config.model_type -> the GgufArch its language model is written as (the vision
    # tower goes to llama.cpp's separate mmproj file, which mlx-bridge does not write)
    text: dict[str, "GgufArch"] = field(default_factory=dict)
    gdn: bool = False  # gated delta net layers (Qwen3-Next, Qwen3.5): Qwen3NextModel's ssm hparams and tensors
    mrope: bool = False  # _Qwen35MRopeMixin: M-RoPE sections (Qwen3.5)
    no_shift: tuple[str, ...] = ()  # "*norm.weight" suffixes norm_shift leaves alone
    mla: bool = False  # DeepSeek's multi-head latent attention: DeepseekV2Model's hparams, kv_b_proj -> k_b, v_b
    # HF tensor name suffix of a per-layer scalar -> the GGUFWriter method its values (one per layer) go to as
    # metadata, not as a tensor (Apertus's xIELU parameters, ApertusModel.modify_tensors)
    scalars: dict[str, str] = field(default_factory=dict)
    lora_attn: bool = False  # MiniCPM3Model: q/kv low-rank attention, key length nope + rope, kv_b_proj kept whole
    shared_ffn: str = ""  # config key of the shared-expert count: their one MLP is that many expert widths wide
    halves_cols: bool = False  # `halves` splits the columns (axis -1) and transposes each (Qwen3-VL-MoE's experts)
    imrope: bool = False  # interleaved M-RoPE: text rotates every rotary pair the sections do not cover by position 0
    indexer: bool = False  # DSA indexer types: llama.cpp assumes every indexer its own (below 2^20 positions)
    swa_step: int = 0  # llama.cpp ropes (and windows) every layer but each n-th (a fixed step): layer_types must agree
    rope_on_swa: bool = False  # llama.cpp ropes only the windowed layers (mlx-lm every layer when none is windowed)
    last_moe: str = ""  # config key of the last MoE layer, which llama.cpp has not (MoE to the end): the last layer
    # HF tensor name suffix -> the two llama.cpp tensors a stacked (E, in, 2 out) gate_up weight (or its (E, 2 out) bias)
    # becomes, each weight laid out (E, out, in): its output columns "interleaved" (GptOssModel.modify_tensors:
    # [..., ::2] -> gate, [..., 1::2] -> up) or in "halves" (Llama4Model.modify_tensors: first half gate, then up)
    gate_up: dict[str, tuple[gguf.MODEL_TENSOR, gguf.MODEL_TENSOR]] = field(default_factory=dict)
    gate_up_layout: str = "interleaved"
    ffn_key: str = "intermediate_size"  # the config key of the dense feed-forward length (Llama4: intermediate_size_mlp)
    kq_norm_unless_experts: int = 0  # llama.cpp q/k-normalises unless the model has this many experts (Llama4's 128E)
    needs_no_rope_layer: bool = False  # llama.cpp aborts (an unused attention-temperature input) without a no-rope layer
    shortconv: bool = False  # LFM2's short-convolution layers: LFM2Model's hparams
    # a hybrid's layer types (config layer_types / layers_block_type values, or hybrid_override_pattern characters) ->
    # "attention", "ssm", "conv", "mlp" or "moe": kv heads per layer (0 but on attention layers), and with
    # `ff_per_layer` the MLP width per layer (0 but on mlp layers: NemotronH)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    ff_per_layer: bool = False
    # Mamba2 layers among the attention layers (GraniteHybridModel's ssm hparams): "conv", "state", "groups", "heads"
    # -> config key, "inner" -> the two config keys whose product is the inner size
    ssm2_keys: dict[str, object] = field(default_factory=dict)
    h1: bool = False  # Falcon-H1: attention and Mamba2 side by side in every layer (FalconH1Model's hparams)
    eps_key: str = "rms_norm_eps"  # the config key of the RMS norms' epsilon
    mxfp4_experts: bool = False  # expert weights MXFP4 in MLX stay MXFP4 (GptOssModel.repack_mxfp4), whatever the type


_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's Conv1D stores (in, out)
_PARALLEL = {"add_parallel_residual": "use_parallel_residual"}
_MOE = {"add_expert_feed_forward_length": "moe_intermediate_size"}
# DeepSeek-style routed experts (convert_hf_to_gguf's Glm4MoeModel, Dots1Model): config key per hparam
_ROUTED = {**_MOE, "add_expert_shared_count": "n_shared_experts", "add_leading_dense_block_count": "first_k_dense_replace",
           "add_expert_weights_scale": "routed_scaling_factor", "add_expert_weights_norm": "norm_topk_prob"}
_SIGMOID = {"add_expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID}  # transformers routes by sigmoid
_GRANITE = {"add_attention_scale": "attention_multiplier", "add_embedding_scale": "embedding_multiplier",
            "add_residual_scale": "residual_multiplier", "add_logit_scale": "logits_scaling"}
_MAMBA = {"A_log": "neg_exp", "conv1d.weight": "squeeze"}  # MambaModel.modify_tensors: A = -exp(A_log); (d, 1, k) -> (d, k)
# DeepseekV2Model.set_gguf_parameters (+ TextModel's expert groups); the MLA lengths are written by hparams.add_mla
_MLA = {**_ROUTED, "add_q_lora_rank": "q_lora_rank", "add_kv_lora_rank": "kv_lora_rank",
        "add_expert_group_count": "n_group", "add_expert_group_used_count": "topk_group"}
# Mamba2Model.modify_tensors: A = -exp(A_log) and D as (n_head, 1), the conv kernel squeezed, the gated norm per group
_MAMBA2_OPS = {"A_log": "neg_exp_col", "D": "col", "conv1d.weight": "squeeze", "mixer.norm.weight": "groups",
               "mamba.norm.weight": "groups"}
# NemotronH's layer types, old and new spellings, and its hybrid_override_pattern characters (as mlx-lm reads them)
_NEMOTRON_H_KINDS = {"full_attention": "attention", "attention": "attention", "*": "attention", "linear_attention": "ssm",
                     "mamba": "ssm", "M": "ssm", "mlp": "mlp", "-": "mlp", "moe": "moe", "E": "moe"}
_MLA_NO_GROUPS = {k: v for k, v in _MLA.items() if "group" not in k}
_GEMMA2 = {"add_attn_logit_softcapping": "attn_logit_softcapping",
           "add_final_logit_softcapping": "final_logit_softcapping"}

_GEMMA3 = GgufArch(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, sliding_layers=True, query_scale_head_dim=True,
                   extra={"add_final_logit_softcapping": "final_logit_softcapping",
                          "add_rope_freq_base_swa": "rope_local_base_freq"})
_MINISTRAL3 = GgufArch(gguf.MODEL_ARCH.MISTRAL3, permute_qk=True, llama_extras=True, rope_types=("yarn",), extra={
    "add_rope_scaling_yarn_log_mul": "rope_parameters.mscale_all_dim",
    "add_attn_temperature_scale": "rope_parameters.llama_4_scaling_beta"})

# Llama4Model (mlx-lm's llama4): llama.cpp chunks attention every 8192 tokens on 3 of 4 layers, skips rope on every
# 4th and scales its queries by the attention temperature (floor 8192, scale 0.1), as mlx-lm does (which also skips
# rope on every 4th layer, whatever the config says); MoE every interleave_moe_layer_step-th layer. mlx-lm normalises
# q/k with eps 1e-6, transformers and llama.cpp with rms_norm_eps.
_LLAMA4 = GgufArch(gguf.MODEL_ARCH.LLAMA4, llama_extras=True, no_rope_step=4, needs_no_rope_layer=True,
                   ffn_key="intermediate_size_mlp", kq_norm_unless_experts=128, gate_up={"experts.gate_up_proj": (gguf.MODEL_TENSOR.FFN_GATE_EXP,
                                                                                 gguf.MODEL_TENSOR.FFN_UP_EXP)},
                   gate_up_layout="halves", ops={"experts.down_proj": "swap_last"},
                   extra={"add_expert_feed_forward_length": "intermediate_size",
                          "add_interleave_moe_layer_step": "interleave_moe_layer_step"},
                   requires={"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1,
                             "attn_temperature_tuning": True})

# _LinearAttentionVReorderBase / Qwen3NextModel.modify_tensors: HF suffix -> tensors.GDN op
_GDN_OPS = {"in_proj_qkv.weight": "gdn_qkv", "in_proj_z.weight": "gdn_z", "in_proj_a.weight": "gdn_ab",
            "in_proj_b.weight": "gdn_ab", "A_log": "gdn_a", "dt_bias": "gdn_dt", "conv1d.weight": "gdn_conv",
            "out_proj.weight": "gdn_out"}
_QWEN35 = GgufArch(gguf.MODEL_ARCH.QWEN35, gdn=True, mrope=True, partial_rope=True, norm_shift=1.0,
                   no_shift=("linear_attn.norm.weight",), ops=_GDN_OPS)

GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "mistral": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "mixtral": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3),
    "qwen3_moe": GgufArch(gguf.MODEL_ARCH.QWEN3MOE, extra=_MOE, requires={"norm_topk_prob": True}),
    "phi3": GgufArch(gguf.MODEL_ARCH.PHI3),
    "gemma": GgufArch(gguf.MODEL_ARCH.GEMMA, norm_shift=1.0),
    "gemma2": GgufArch(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, extra=_GEMMA2, sliding_window_full=True,
                       query_scale_head_dim=True),
    "gemma3_text": _GEMMA3,
    # Gemma3Model / Mistral3Model (convert_hf_to_gguf) write the language model of these as the text GGUF
    "gemma3": GgufArch(gguf.MODEL_ARCH.GEMMA3, text={"gemma3_text": _GEMMA3}),
    "qwen3_5": GgufArch(gguf.MODEL_ARCH.QWEN35, text={"qwen3_5_text": _QWEN35}),
    "qwen3_5_moe": GgufArch(gguf.MODEL_ARCH.QWEN35MOE, text={"qwen3_5_moe_text": GgufArch(
        gguf.MODEL_ARCH.QWEN35MOE, gdn=True, mrope=True, partial_rope=True, norm_shift=1.0, no_shift=("linear_attn.norm.weight",),
        ops=_GDN_OPS, extra={**_MOE, "add_expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
        halves={"experts.gate_up_proj": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)})}),
    # Qwen3NextModel: V heads stay grouped; in_proj_qkvz -> attn_qkv (all q, all k, all v) + attn_gate (tensors.gdn)
    "qwen3_next": GgufArch(gguf.MODEL_ARCH.QWEN3NEXT, gdn=True, partial_rope=True, norm_shift=1.0,
                           no_shift=("linear_attn.norm.weight",), ops={**_MAMBA, "in_proj_qkvz.weight": "gdn_qkvz"},
                           extra={**_MOE, "add_expert_shared_feed_forward_length": "shared_expert_intermediate_size"}),
    "mistral3": GgufArch(gguf.MODEL_ARCH.MISTRAL3, text={
        "ministral3": _MINISTRAL3, "mistral": GgufArch(gguf.MODEL_ARCH.MISTRAL3, permute_qk=True, llama_extras=True)}),
    "olmo2": GgufArch(gguf.MODEL_ARCH.OLMO2),
    "olmoe": GgufArch(gguf.MODEL_ARCH.OLMOE, requires={"norm_topk_prob": False}, no_gqa=True),
    "granite": GgufArch(gguf.MODEL_ARCH.GRANITE, permute_qk=True, llama_extras=True, extra=_GRANITE),
    "granitemoe": GgufArch(gguf.MODEL_ARCH.GRANITE_MOE, permute_qk=True, llama_extras=True, extra=_GRANITE, halves={
        "input_linear.weight": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)}),
    "cohere": GgufArch(gguf.MODEL_ARCH.COMMAND_R, extra={"add_logit_scale": "logit_scale"}),
    "starcoder2": GgufArch(gguf.MODEL_ARCH.STARCODER2),
    "qwen2_moe": GgufArch(gguf.MODEL_ARCH.QWEN2MOE, requires={"norm_topk_prob": False},
                          extra={**_MOE, "add_expert_shared_feed_forward_length": "shared_expert_intermediate_size"}),
    "ministral3": _MINISTRAL3,
    "mamba": GgufArch(gguf.MODEL_ARCH.MAMBA, ssm=True, ops=_MAMBA, requires={"use_bias": False}),
    "falcon_mamba": GgufArch(gguf.MODEL_ARCH.MAMBA, ssm=True, ops=_MAMBA, requires={"use_bias": False},
                             eps_also="mixer_rms_eps"),
    "mamba2": GgufArch(gguf.MODEL_ARCH.MAMBA2, ssm=True, requires={"use_bias": False}, ops=_MAMBA2_OPS),
    "smollm3": GgufArch(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True, llama_extras=True, no_rope_step=4),
    "exaone": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "internlm3": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "iquestcoder": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_extras=True),
    "seed_oss": GgufArch(gguf.MODEL_ARCH.SEED_OSS),
    "olmo3": GgufArch(gguf.MODEL_ARCH.OLMO2, sliding_layers=True),
    "ernie4_5": GgufArch(gguf.MODEL_ARCH.ERNIE4_5),
    # llama-model's exaone4: a sliding window (and rope only on windowed layers) only in the 64-layer 32B shape
    "exaone4": GgufArch(gguf.MODEL_ARCH.EXAONE4, sliding_layers=True, swa_layer_counts=(64,)),
    "hunyuan_v1_dense": GgufArch(gguf.MODEL_ARCH.HUNYUAN_DENSE),
    "nemotron": GgufArch(gguf.MODEL_ARCH.NEMOTRON, norm_shift=1.0, partial_rope=True, extra={"add_layer_norm_eps": "norm_eps"}),
    "cohere2": GgufArch(gguf.MODEL_ARCH.COHERE2, partial_rope=True, sliding_layers=True, extra={"add_logit_scale": "logit_scale"}),
    "glm4": GgufArch(gguf.MODEL_ARCH.GLM4, partial_rope=True),
    "phi": GgufArch(gguf.MODEL_ARCH.PHI2, partial_rope=True),
    "gpt_bigcode": GgufArch(gguf.MODEL_ARCH.STARCODER, kv_heads="multi_query"),
    "gpt2": GgufArch(gguf.MODEL_ARCH.GPT2, kv_heads="mha", ops={k: "transpose" for k in _CONV1D}),
    "gpt_neox": GgufArch(gguf.MODEL_ARCH.GPTNEOX, partial_rope=True, kv_heads="mha", extra=_PARALLEL,
                         ops={"query_key_value.weight": "qkv_by_kind", "query_key_value.bias": "qkv_by_kind"}),
    "glm4_moe": GgufArch(gguf.MODEL_ARCH.GLM4_MOE, partial_rope=True, extra=_ROUTED,
                         consts=_SIGMOID),
    "dots1": GgufArch(gguf.MODEL_ARCH.DOTS1, extra=_ROUTED, no_gqa=True, consts=_SIGMOID),
    # transformers' DeepseekV2 routes by softmax, V3 and GLM-4.7-Flash by sigmoid + e_score_correction_bias (exp_probs_b)
    # (DeepSeek-V2's group_limited_greedy picks groups by their max, llama.cpp by their top-2 sum: groups not written)
    "deepseek_v2": GgufArch(gguf.MODEL_ARCH.DEEPSEEK2, mla=True, extra=_MLA_NO_GROUPS, rope_types=("yarn",),
                            consts={"add_expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}),
    "deepseek_v3": GgufArch(gguf.MODEL_ARCH.DEEPSEEK2, mla=True, extra=_MLA, rope_types=("yarn",), consts=_SIGMOID),
    "glm4_moe_lite": GgufArch(gguf.MODEL_ARCH.DEEPSEEK2, mla=True, extra=_MLA, rope_types=("yarn",), consts=_SIGMOID),
    "stablelm": GgufArch(gguf.MODEL_ARCH.STABLELM, partial_rope=True, extra=_PARALLEL, requires={"qk_layernorm": False}),
    # --- issue 15, second round (s3-15a): gpt_oss, llama4, lfm2, granitemoehybrid, falcon_h1, nemotron_h, minimax_m2
    # GptOssModel: attention sinks, biased experts with gate/up interleaved, windowed attention on the layer_types
    # "sliding_attention" layers, llama.cpp's swiglu_oai with its limit fixed at 7
    "gpt_oss": GgufArch(gguf.MODEL_ARCH.GPT_OSS, sliding_layers=True, rope_types=("yarn",), mxfp4_experts=True,
                        extra={"add_expert_feed_forward_length": "intermediate_size"}, requires={"swiglu_limit": 7.0},
                        ops={"experts.down_proj": "swap_last"}, gate_up={
                            "experts.gate_up_proj": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP),
                            "experts.gate_up_proj_bias": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)}),
    "lfm2": GgufArch(gguf.MODEL_ARCH.LFM2, shortconv=True, layer_kinds={"full_attention": "attention", "conv": "conv"},
                     eps_key="norm_eps",
                     ops={"conv.conv.weight": "squeeze"}),
    # GraniteHybridModel: Mamba2 layers (Mamba2Model's layout) and GraniteMoe attention layers; rope on them as the
    # config says (llama.cpp reads rope_scaling.finetuned as the switch; the converter writes it off for hybrids)
    "granitemoehybrid": GgufArch(gguf.MODEL_ARCH.GRANITE_HYBRID, permute_qk=True, llama_extras=True, ops=_MAMBA2_OPS,
                                 layer_kinds={"attention": "attention", "mamba": "ssm"}, ssm2_keys={
                                     "conv": "mamba_d_conv", "state": "mamba_d_state", "groups": "mamba_n_groups",
                                     "heads": "mamba_n_heads", "inner": ("mamba_expand", "hidden_size")},
                                 extra={**_GRANITE, "add_expert_shared_feed_forward_length": "shared_intermediate_size"},
                                 halves={"shared_mlp.input_linear.weight": (gguf.MODEL_TENSOR.FFN_GATE_SHEXP,
                                                                            gguf.MODEL_TENSOR.FFN_UP_SHEXP),
                                         "input_linear.weight": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)}),
    # NemotronHModel (dense: no "moe" layers, which llama.cpp's converter writes as nemotron_h_moe): Mamba2, attention
    # without rope, and squared-ReLU MLP layers, one kind a layer
    "nemotron_h": GgufArch(gguf.MODEL_ARCH.NEMOTRON_H, ops=_MAMBA2_OPS, eps_key="layer_norm_epsilon", ff_per_layer=True,
                           layer_kinds=_NEMOTRON_H_KINDS, requires={"mlp_hidden_act": "relu2"}, ssm2_keys={
                               "conv": "conv_kernel", "state": "ssm_state_size", "groups": "n_groups",
                               "heads": "mamba_num_heads", "inner": ("mamba_num_heads", "mamba_head_dim")}),
    # MiniMaxM2Model: whole-projection q/k norms, partial rope over rotary_dim, experts routed by sigmoid with a
    # correction bias and renormalised top-k weights (llama.cpp fixes the norms and the renormalisation)
    "minimax_m2": GgufArch(gguf.MODEL_ARCH.MINIMAXM2, consts=_SIGMOID, requires={"use_qk_norm": True, "scoring_func": "sigmoid"},
                           extra={"add_expert_feed_forward_length": "intermediate_size", "add_rope_dimension_count": "rotary_dim"}),
    # FalconH1Model: mlx-lm folds the muP multipliers into the weights as llama.cpp's converter does, so they are
    # written as MLX holds them; llama.cpp gates the Mamba2 output before its grouped norm
    "falcon_h1": GgufArch(gguf.MODEL_ARCH.FALCON_H1, h1=True, ops=_MAMBA2_OPS),
    # Llama4Model: the language model of Llama 4 (mlx-lm's llama4); the mmproj file is not written
    "llama4": GgufArch(gguf.MODEL_ARCH.LLAMA4, text={"llama4_text": _LLAMA4}),
}

# written since the third session (a block of its own)
GGUF_ARCHS.update({
    # ApertusModel: a LlamaModel without the q/k permutation (neox rope); xIELU's per-layer scalars as metadata
    "apertus": GgufArch(gguf.MODEL_ARCH.APERTUS, llama_extras=True, scalars={
        "act_fn.alpha_n": "add_xielu_alpha_n", "act_fn.alpha_p": "add_xielu_alpha_p", "act_fn.beta": "add_xielu_beta",
        "act_fn.eps": "add_xielu_eps"}),
    # Ernie4_5MoeModel; llama.cpp loads experts in every layer from the first MoE one (so one MoE layer step)
    "ernie4_5_moe": GgufArch(gguf.MODEL_ARCH.ERNIE4_5_MOE, shared_ffn="moe_num_shared_experts", last_moe="moe_layer_end_index",
                             requires={"moe_layer_interval": 1}, extra={
        **_MOE, "add_interleave_moe_layer_step": "moe_layer_interval", "add_leading_dense_block_count": "moe_layer_start_index",
        "add_expert_shared_count": "moe_num_shared_experts"}),
    # ExaoneMoEModel: rope only on the windowed layers (as mlx-lm when some layer is windowed); sigmoid routing
    "exaone_moe": GgufArch(gguf.MODEL_ARCH.EXAONE_MOE, sliding_layers=True, rope_on_swa=True, shared_ffn="num_shared_experts", consts=_SIGMOID,
                           extra={**_MOE, "add_expert_shared_count": "num_shared_experts", "add_leading_dense_block_count":
                                  "first_k_dense_replace", "add_expert_weights_scale": "routed_scaling_factor",
                                  "add_expert_weights_norm": "norm_topk_prob", "add_expert_group_count": "n_group",
                                  "add_expert_group_used_count": "topk_group", "add_vocab_size": "vocab_size"}),
    # AfmoeModel: no permutation, attention gate, sigmoid routing with expert_bias; llama.cpp always scales embeddings (muP)
    # (transformers always renormalises the top-k weights, mlx-lm unless route_norm is false)
    "afmoe": GgufArch(gguf.MODEL_ARCH.AFMOE, llama_extras=True, sliding_layers=True, swa_step=4,
                      consts={**_SIGMOID, "add_expert_weights_norm": True},
                      requires={"mup_enabled": True, "score_func": "sigmoid", "route_norm": True}, extra={
        **_MOE, "add_expert_shared_count": "num_shared_experts", "add_leading_dense_block_count": "num_dense_layers",
        "add_expert_weights_scale": "route_scale"}),
    # GlmMoeDsaModel: DeepSeek's MLA + the DSA indexer (top-k keys per query); every indexer its own ("full")
    "glm_moe_dsa": GgufArch(gguf.MODEL_ARCH.GLM_DSA, mla=True, indexer=True, rope_types=("yarn",), consts=_SIGMOID, extra={
        **_MLA, "add_indexer_head_count": "index_n_heads", "add_indexer_key_length": "index_head_dim",
        "add_indexer_top_k": "index_topk"}),
    # the language model of these wrappers (LlamaModel, Qwen2VLModel, Qwen3VLTextModel, Qwen3VLMoeTextModel; one warning:
    # the vision tower's mmproj file is not written); M-RoPE sections as TextModel writes them (text: one position each)
    "llava": GgufArch(gguf.MODEL_ARCH.LLAMA, text={t: GGUF_ARCHS[t] for t in ("llama", "mistral")}),
    "qwen3_vl": GgufArch(gguf.MODEL_ARCH.QWEN3VL, text={"qwen3_vl_text": GgufArch(gguf.MODEL_ARCH.QWEN3VL, mrope=True, imrope=True)}),
    # Qwen3VLMoeTextModel: the stacked experts (E, hidden, 2 x ff) / (E, ff, hidden) transposed to llama.cpp's rows
    "qwen3_vl_moe": GgufArch(gguf.MODEL_ARCH.QWEN3VLMOE, text={"qwen3_vl_moe_text": GgufArch(
        gguf.MODEL_ARCH.QWEN3VLMOE, mrope=True, imrope=True, extra=_MOE, requires={"norm_topk_prob": True},
        ops={"experts.down_proj": "swap_last"},
        halves={"experts.gate_up_proj": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)}, halves_cols=True)}),
    # ChatGLMModel (GLM-4-9B-chat-hf): interleaved rope over half of each head, gate_up_proj as one ffn_up
    "glm": GgufArch(gguf.MODEL_ARCH.CHATGLM, partial_rope=True),
    # MiniCPM3Model: no permutation (neox rope); longrope's factors as rope_factors_long/short tensors
    # (its graph hard-codes MiniCPM3-4B's scales; its k/v have as many heads as q, whatever num_key_value_heads says)
    "minicpm3": GgufArch(gguf.MODEL_ARCH.MINICPM3, lora_attn=True, kv_heads="mha", rope_types=("longrope",), extra={
        "add_q_lora_rank": "q_lora_rank", "add_kv_lora_rank": "kv_lora_rank"},
        requires={"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256}),
})

# llama.cpp converts these, but its graph computes something else than MLX (and transformers) do
GGUF_REFUSED: dict[str, str] = {
    "phimoe": "llama.cpp's phimoe routes experts by softmax top-k; PhiMoE routes by sparsemixer (logits differ)",
    # issue 15, second round (s3-15a)
    "llama4_text": "mlx-lm's llama4_text (MobileLLM) attends to the whole context; llama.cpp's llama4 chunks attention "
                   "every 8192 tokens and scales the queries of every 4th layer from position 8191 on (and aborts on a "
                   "model without such a layer, as the 2-layer test model)",
}

LLAMA_CPP = json.loads(Path(__file__).with_name("llama_cpp_archs.json").read_text())

# (third session) llama.cpp's graph computes otherwise, measured on tiny models against transformers
_QWEN2VL_EPS = ("llama.cpp's qwen2vl never reads the rms_norm_eps key and normalises with epsilon 0 (logits off by 4e-4 "
                "with 1e-6 on a tiny model)")
GGUF_REFUSED.update({"qwen2_vl": _QWEN2VL_EPS, "qwen2_5_vl": _QWEN2VL_EPS})


def refusal(model_type: str) -> str:
    """Why `model_type` has no GGUF export, in one sentence.

    Example:
        >>> refusal("helium")  # doctest: +SKIP
        "llama.cpp (llama-cpp-python 0.3.36) has no converter for HeliumForCausalLM"
    """
    if model_type in GGUF_REFUSED:
        return GGUF_REFUSED[model_type]
    from ...archs import get_arch

    cls = get_arch({"model_type": model_type}).architecture
    where = f"llama.cpp (llama-cpp-python {LLAMA_CPP['llama_cpp']})"
    arch = {k.lower(): v for k, v in LLAMA_CPP["hf_class"].items()}.get(cls.lower())  # PhiMoE/Phimoe
    if arch is None:
        return f"{where} has no converter for {cls}"
    if not hasattr(gguf.MODEL_ARCH, arch):  # PyPI's gguf-py lags the converter vendored in llama-cpp-python
        return (f"{where} converts {cls} as {arch.lower()}, an arch the gguf package (gguf-py "
                f"{metadata.version('gguf')}) does not know yet")
    return f"{where} converts {cls} as {arch.lower()}, which mlx-bridge does not write yet"


def text_name(hf: str) -> str:
    """A wrapper's language-model tensor name as the text model's: "model.language_model.x" and
    "language_model.model.x" -> "model.x", "language_model.lm_head.weight" -> "lm_head.weight"."""
    return hf.replace("model.language_model.", "model.").removeprefix("language_model.")


def merged_expert_name(per_expert: str) -> str:
    """HF name of a stacked expert tensor: "...experts.{e}.w1.weight" -> "...experts.w1.weight"."""
    return per_expert.replace(".{e}.", ".")
