"""Dense architectures whose mlx-lm layout equals the Hugging Face layout (identity key map).

Each entry: HF class, the HF parameter table (as `save_pretrained` writes it, read off transformers
5.24 models built from configs), and the mlx-lm 0.32.2 `ModelArgs` defaults that matter when a config
omits the field. A tied `lm_head.weight` is absent in both layouts.
"""

from __future__ import annotations

from .base import Arch

_L = "model.layers.{}."
_ATTN = tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkvo")
_MLP = tuple(_L + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
_NORMS = (_L + "input_layernorm.weight", _L + "post_attention_layernorm.weight")
_QK_NORM = (_L + "self_attn.q_norm.weight", _L + "self_attn.k_norm.weight")
_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LLAMA_PARAMS = _TOP + _ATTN + _MLP + _NORMS

_LLAMA_DEFAULTS = {"rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": True}


def _arch(model_type, cls, params, **kw) -> Arch:
    return Arch(model_type, cls, tuple(params), **kw)


DENSE = [
    _arch("llama", "LlamaForCausalLM", LLAMA_PARAMS, mlx_defaults=_LLAMA_DEFAULTS),
    # mlx-lm remaps mistral to its llama module: llama's defaults apply, and a sliding window only
    # through `layer_types` (a bare `sliding_window` is ignored, see hf_config.effective_config)
    _arch("mistral", "MistralForCausalLM", LLAMA_PARAMS, mlx_defaults=_LLAMA_DEFAULTS),
    _arch("qwen2", "Qwen2ForCausalLM", LLAMA_PARAMS,
          mlx_defaults={"rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True}),
    _arch("qwen3", "Qwen3ForCausalLM", LLAMA_PARAMS + _QK_NORM, reads_rope_parameters=True),
    _arch("phi3", "Phi3ForCausalLM", _TOP + (_L + "self_attn.qkv_proj.weight", _L + "self_attn.o_proj.weight",
          _L + "mlp.gate_up_proj.weight", _L + "mlp.down_proj.weight") + _NORMS,
          mlx_defaults={"rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False}),
    # mlx-lm's gemma (v1) MLP uses exact GELU (nn.gelu); transformers rewrites "gelu" to the tanh
    # approximation for Gemma, so the export names the exact one. vLLM only implements the tanh form.
    _arch("gemma", "GemmaForCausalLM", LLAMA_PARAMS, mlx_defaults={"rope_theta": 10000},
          mlx_forces={"hidden_act": "gelu_python", "hidden_activation": None}),
    _arch("gemma2", "Gemma2ForCausalLM", LLAMA_PARAMS + (_L + "pre_feedforward_layernorm.weight",
          _L + "post_feedforward_layernorm.weight"),
          mlx_defaults={"rope_theta": 10000, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                        "query_pre_attn_scalar": 144.0}),
    _arch("gemma3_text", "Gemma3ForCausalLM", LLAMA_PARAMS + _QK_NORM + (_L + "pre_feedforward_layernorm.weight",
          _L + "post_feedforward_layernorm.weight"),
          mlx_defaults={"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
                        "sliding_window": 512, "sliding_window_pattern": 6, "rope_scaling": None}),
    _arch("olmo2", "Olmo2ForCausalLM", _TOP + _ATTN + _MLP + _QK_NORM + (_L + "post_attention_layernorm.weight",
          _L + "post_feedforward_layernorm.weight"), mlx_defaults=_LLAMA_DEFAULTS),
    _arch("olmo3", "Olmo3ForCausalLM", _TOP + _ATTN + _MLP + _QK_NORM + (_L + "post_attention_layernorm.weight",
          _L + "post_feedforward_layernorm.weight"), mlx_defaults={"rope_scaling": None, "tie_word_embeddings": False}),
    _arch("granite", "GraniteForCausalLM", LLAMA_PARAMS, mlx_defaults={"rope_scaling": None, "tie_word_embeddings": True}),
    _arch("helium", "HeliumForCausalLM", LLAMA_PARAMS),
    _arch("ernie4_5", "Ernie4_5ForCausalLM", LLAMA_PARAMS),
    _arch("seed_oss", "SeedOssForCausalLM", LLAMA_PARAMS, mlx_defaults=_LLAMA_DEFAULTS),
    _arch("internlm3", "InternLM3ForCausalLM", LLAMA_PARAMS,
          mlx_defaults={"rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False}),
    _arch("exaone4", "Exaone4ForCausalLM", _TOP + _ATTN + _MLP + _QK_NORM + (_L + "post_attention_layernorm.weight",
          _L + "post_feedforward_layernorm.weight")),
    _arch("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", LLAMA_PARAMS + (_L + "self_attn.query_layernorm.weight",
          _L + "self_attn.key_layernorm.weight"),
          mlx_defaults={"rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False}),
    _arch("cohere", "CohereForCausalLM", _TOP + _ATTN + _MLP + (_L + "input_layernorm.weight",),
          mlx_defaults={"rope_theta": 8000000.0, "logit_scale": 0.0625}),
    _arch("starcoder2", "Starcoder2ForCausalLM", _TOP + ("model.norm.bias",) + _ATTN + (
          _L + "mlp.c_fc.weight", _L + "mlp.c_fc.bias", _L + "mlp.c_proj.weight", _L + "mlp.c_proj.bias",
          _L + "input_layernorm.bias", _L + "post_attention_layernorm.bias") + _NORMS,
          mlx_defaults={"rope_theta": 100000, "tie_word_embeddings": True},
          mlx_forces={"hidden_act": "gelu"}),  # mlx-lm's starcoder2 MLP: exact nn.gelu
    _arch("stablelm", "StableLmForCausalLM", LLAMA_PARAMS + ("model.norm.bias", _L + "input_layernorm.bias",
          _L + "post_attention_layernorm.bias")),
    _arch("nemotron", "NemotronForCausalLM", _TOP + ("model.norm.bias",) + _ATTN + (
          _L + "mlp.up_proj.weight", _L + "mlp.down_proj.weight", _L + "input_layernorm.bias",
          _L + "post_attention_layernorm.bias") + _NORMS,
          mlx_defaults={"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_scaling": None,
                        "tie_word_embeddings": False}),
]
