"""Architecture names the serving engines implement natively (read from their code, see docs/serving.md).

A model type's engine name is its `Arch.architecture` (transformers' class name, which vLLM and
TensorRT-LLM key their registries by); these sets say whether the engine has its own class for it.
Others run through vLLM's Transformers backend (slower, still the same weights).
"""

from __future__ import annotations

# vLLM's native decoder-only classes (registry.py `_TEXT_GENERATION_MODELS`), those mlx-lm also trains.
VLLM_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "OlmoeForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "Starcoder2ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM", "PhiMoEForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM", "InternLM2ForCausalLM",
    "StableLmForCausalLM", "MiniCPMForCausalLM", "Exaone4ForCausalLM", "Glm4ForCausalLM",
    "Lfm2ForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM",
})

# TensorRT-LLM PyTorch backend, docs/source/models/supported-models.md.
TRTLLM_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM",
    "DeepseekV3ForCausalLM", "GptOssForCausalLM", "Exaone4ForCausalLM", "NemotronForCausalLM",
    "Cohere2ForCausalLM", "GraniteForCausalLM", "Glm4MoeForCausalLM",
})

