"""Per-architecture GGUF data, keyed by Hugging Face `model_type` (after convert_hf_to_gguf.py).

What llama.cpp needs beyond the HF tensors: its architecture name, the row permutation of q/k for
llama-style rope (`LlamaModel.permute`), norms stored as `1 + w` (Gemma), and the hyperparameters each
arch reads. Tensor names are never typed here: `gguf.get_tensor_name_map` maps the HF names, and
stacked experts use the merged HF name convert_hf_to_gguf builds before mapping.

Example:
    >>> GGUF_ARCHS["mixtral"].arch.name, GGUF_ARCHS["mixtral"].permute_qk
    ('LLAMA', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    no_gqa: bool = False  # llama.cpp sizes this arch's k_norm by n_embd: num_key_value_heads must equal the heads


_MOE = {"add_expert_feed_forward_length": "moe_intermediate_size"}
_GEMMA2 = {"add_attn_logit_softcapping": "attn_logit_softcapping",
           "add_final_logit_softcapping": "final_logit_softcapping"}

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
    "gemma3_text": GgufArch(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, sliding_layers=True, query_scale_head_dim=True,
                            extra={"add_final_logit_softcapping": "final_logit_softcapping",
                                   "add_rope_freq_base_swa": "rope_local_base_freq"}),
    "olmo2": GgufArch(gguf.MODEL_ARCH.OLMO2),
    "olmoe": GgufArch(gguf.MODEL_ARCH.OLMOE, requires={"norm_topk_prob": False}, no_gqa=True),
    "granite": GgufArch(gguf.MODEL_ARCH.GRANITE, permute_qk=True, llama_extras=True,
                        extra={"add_attention_scale": "attention_multiplier", "add_embedding_scale": "embedding_multiplier",
                               "add_residual_scale": "residual_multiplier", "add_logit_scale": "logits_scaling"}),
    "cohere": GgufArch(gguf.MODEL_ARCH.COMMAND_R, extra={"add_logit_scale": "logit_scale"}),
    "starcoder2": GgufArch(gguf.MODEL_ARCH.STARCODER2),
    "qwen2_moe": GgufArch(gguf.MODEL_ARCH.QWEN2MOE, requires={"norm_topk_prob": False},
                          extra={**_MOE, "add_expert_shared_feed_forward_length": "shared_expert_intermediate_size"}),
}


def merged_expert_name(per_expert: str) -> str:
    """HF name of a stacked expert tensor: "...experts.{e}.w1.weight" -> "...experts.w1.weight"."""
    return per_expert.replace(".{e}.", ".")
