"""Mixture-of-experts architectures: mlx-lm stacks the experts, Hugging Face keeps one module each.

mlx-lm's `sanitize` turns `...experts.{e}.<proj>.weight` (out, in) into `...switch_mlp.<proj>.weight`
(E, out, in) (also `.scales` / `.biases` when quantized). The inverse writes expert e = stacked[e] under
the per-expert name that `save_pretrained` writes (transformers 5.24 keeps that on-disk layout).
"""

from __future__ import annotations

from .base import Arch
from .dense import _ATTN, _NORMS, _QK_NORM, _TOP, _L

_QWEN_EXPERTS = {_L + f"mlp.switch_mlp.{p}": _L + "mlp.experts.{e}." + p for p in ("gate_proj", "up_proj", "down_proj")}
_QWEN_MOE = (_L + "mlp.gate.weight",) + tuple(v + ".weight" for v in _QWEN_EXPERTS.values())

MOE = [
    Arch("mixtral", "MixtralForCausalLM",
         _TOP + _ATTN + _NORMS + (_L + "block_sparse_moe.gate.weight",)
         + tuple(_L + "block_sparse_moe.experts.{e}." + w + ".weight" for w in ("w1", "w2", "w3")),
         experts={_L + "block_sparse_moe.switch_mlp.gate_proj": _L + "block_sparse_moe.experts.{e}.w1",
                  _L + "block_sparse_moe.switch_mlp.down_proj": _L + "block_sparse_moe.experts.{e}.w2",
                  _L + "block_sparse_moe.switch_mlp.up_proj": _L + "block_sparse_moe.experts.{e}.w3"},
         mlx_defaults={"rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False}),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", _TOP + _ATTN + _NORMS + _QK_NORM + _QWEN_MOE,
         experts=_QWEN_EXPERTS, num_experts_key="num_experts", mlx_defaults={"rope_scaling": None}),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", _TOP + _ATTN + _NORMS + _QWEN_MOE + tuple(
         _L + f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")) + (_L + "mlp.shared_expert_gate.weight",),
         experts=_QWEN_EXPERTS, num_experts_key="num_experts",
         mlx_defaults={"rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": False}),
    Arch("olmoe", "OlmoeForCausalLM", _TOP + _ATTN + _NORMS + _QK_NORM + _QWEN_MOE,
         experts=_QWEN_EXPERTS, num_experts_key="num_experts",
         mlx_defaults={"norm_topk_prob": False, "rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": True}),
]
