"""Where mlx-lm computes differently from what config.json means to transformers, per model type.

These are the facts the derived data cannot show (they live in mlx-lm's forward code, not in its
weight layout); each was found by a parity test (tests/test_export_parity.py, test_export_archs.py)
and is what `translate/hf_config.py` writes into the exported config so transformers computes what
MLX did. A type that exports wrongly and cannot be fixed here is refused with `refused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Quirks:
    # mlx-lm reads nested `rope_parameters` (transformers v5) for this type; else only top-level
    # rope_theta / rope_scaling (and its own default when absent)
    reads_rope_parameters: bool = False
    # config values mlx-lm computes with whatever config.json says (e.g. the exact GELU it hard-codes)
    mlx_forces: dict = field(default_factory=dict)
    # config fields mlx-lm does not implement: MLX computed as if they were null
    mlx_ignores: tuple[str, ...] = ()
    # config fields mlx-lm computes with this value when config.json states null (or leaves them out)
    null_as: dict = field(default_factory=dict)
    # how mlx-lm lays out attention over layers: None (as transformers), "full" (no sliding window at
    # all), "pattern" (global layers by sliding_window_pattern, not layer_types)
    attention: str | None = None
    honours_layer_types: bool = False  # "full" unless config.json has layer_types (then as transformers)
    states_layer_types: bool = False  # transformers derives a window from other fields: write layer_types
    has_use_sliding_window: bool = False  # the config class reads use_sliding_window
    keeps_sliding_window: bool = False  # the class builds a sliding mask regardless: the value stays, unused
    zero_centred_norms: bool = False  # norm weights stored as w - 1 (mlx-lm and transformers add 1)
    # HF tensors mlx-lm drops and computes without (e.g. a routing correction bias): written as zeros,
    # shaped as in the --hf-base checkpoint, so transformers computes what MLX did
    unused: tuple[str, ...] = ()
    # hub checkpoints hold the bare base model's keys (gpt2: "h.0.attn..."), which is what mlx-lm reads;
    # the causal-LM class loads them too
    hub_saves_base_model: bool = False
    # hub checkpoints hold transformers' own fused layout (experts.gate_up_proj), which is what mlx-lm reads;
    # save_pretrained(save_original_format=False) writes it
    hub_saves_fused: bool = False
    # hub checkpoints hold the experts as MXFP4 blocks (gpt_oss, `archs/hub.py`), the only layout mlx-lm's
    # sanitize reads; the export writes transformers' dequantized parameters
    hub_mxfp4: bool = False
    # (regex, replacement) on saved keys: where hub checkpoints name a tensor otherwise than `save_pretrained`
    # writes it (kimi_linear: transformers' reverse of its block_sparse_moe -> mlp renaming also renames the dense
    # layers' MLP, which the hub keeps under mlp and mlx-lm reads only there); transformers loads either
    hub_renames: tuple[tuple[str, str], ...] = ()
    # mlx-lm takes each layer type's rope_theta from its own config field (mimo_v2_flash: swa_rope_theta for sliding
    # layers), with one partial_rotary_factor: layer type -> field; the export states rope_parameters per layer type
    rope_theta_by_layer_type: dict = field(default_factory=dict)
    # the config field mlx-lm takes its window from (it attends to that many tokens) where transformers reads the same
    # field as one token less than its sliding_window (mimo_v2_flash: sliding_window = sliding_window_size + 1): the
    # export states sliding_window as MLX computed and leaves the field out
    window_field: str | None = None
    # q/k/v/o and MLP projections are heads x head_dim and intermediate_size as translate/validate.py
    # checks them; False for multi-head latent attention (o_proj is heads x v_head_dim) and gated queries
    standard_projections: bool = True
    # mlx-lm's sanitize multiplies these config multipliers into the weights when it converts an HF checkpoint and
    # computes without them (falcon_h1's muP multipliers; a tied head keeps lm_head / embedding): the export states
    # them as 1 so transformers computes MLX's function once, not the multipliers twice
    folded_multipliers: tuple[str, ...] = ()
    refused: str | None = None  # the export is not right for this type (one line, listed in the docs)


# rope settings mlx-lm's rope_utils computes with whatever config.json says, per rope type: its YarnRoPE always
# rounds the correction range (floor / ceil), transformers' `truncate` (gpt-oss ships false) is not read
ROPE_FORCES: dict[str, dict] = {"yarn": {"truncate": True}}

_FULL = dict(attention="full")
_QWEN = dict(attention="full", states_layer_types=True, has_use_sliding_window=True)

QUIRKS: dict[str, Quirks] = {
    "llama": Quirks(**_FULL, honours_layer_types=True),
    # mlx-lm remaps mistral to its llama module: a sliding window only through `layer_types`
    "mistral": Quirks(**_FULL, honours_layer_types=True),
    "mixtral": Quirks(**_FULL),
    "phi3": Quirks(**_FULL),
    "qwen2": Quirks(**_QWEN),
    "qwen3": Quirks(**_QWEN, reads_rope_parameters=True),
    "qwen3_moe": Quirks(**_QWEN),
    "qwen2_moe": Quirks(**_QWEN),
    "gemma2": Quirks(**_FULL, states_layer_types=True, keeps_sliding_window=True, zero_centred_norms=True),
    "gemma3_text": Quirks(attention="pattern", zero_centred_norms=True),
    # mlx-lm's gemma (v1) MLP uses exact GELU (nn.gelu); transformers rewrites "gelu" to the tanh
    # approximation for Gemma, so the export names the exact one. vLLM only implements the tanh form.
    "gemma": Quirks(mlx_forces={"hidden_act": "gelu_python", "hidden_activation": None}, zero_centred_norms=True),
    "starcoder2": Quirks(mlx_forces={"hidden_act": "gelu"}),  # mlx-lm's starcoder2 MLP: exact nn.gelu
    # mlx-lm's glm rotates the whole head (nn.RoPE(dims=head_dim, traditional=True)), whatever
    # partial_rotary_factor says
    "glm": Quirks(mlx_forces={"partial_rotary_factor": 1.0}),
    # mlx-lm's ernie4_5_moe routes without moe_statics.e_score_correction_bias (dropped in sanitize)
    "ernie4_5_moe": Quirks(unused=("model.layers.{}.mlp.moe_statics.e_score_correction_bias",)),
    "gemma3": Quirks(zero_centred_norms=True),
    "gpt2": Quirks(hub_saves_base_model=True),
    "qwen3_5_moe": Quirks(hub_saves_fused=True),
    # hub Olmo-Hybrid checkpoints name the block norms input_layernorm / post_attention_layernorm (mlx-lm reads only
    # those) beside separate q/k/v convolutions; save_pretrained writes the original attention_layer_norm /
    # feedforward_layer_norm, which transformers renames on load
    "olmo_hybrid": Quirks(hub_renames=((r"\.attention_layer_norm\.", ".input_layernorm."),
                                       (r"\.feedforward_layer_norm\.", ".post_attention_layernorm."))),
    "gpt_oss": Quirks(hub_mxfp4=True),
    # multi-head latent attention (q/kv low-rank, v_head_dim), gated queries (q_proj is 2 x heads x head_dim) and
    # per-layer head sizes (gemma4's global layers: global_head_dim; mimo_v2_flash's sliding layers: twice the kv heads)
    **{t: Quirks(standard_projections=False) for t in (
        "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "qwen3_next", "minicpm3", "deepseek_v32", "mistral4",
        "glm_moe_dsa", "gemma4_text")},
    # refused: what parity tests found mlx-lm computes has no HF form (or mlx-lm cannot fine-tune the type)
    "jamba": Quirks(refused="mlx-lm's jamba weighs the chosen experts by a softmax over their k router logits; "
                            "transformers' Jamba by their probabilities in the softmax over all experts (not "
                            "renormalised), and no config field changes either, so no export computes what MLX did"),
    "recurrent_gemma": Quirks(refused="mlx-lm cannot fine-tune recurrent_gemma: its Model skips nn.Module.__init__, "
                                      "so mlx_lm.lora's model.freeze() fails (no '_no_grad'); with no adapter there is "
                                      "nothing to export (a plain base's export of the 3-layer tiny model matches MLX)"),
    # transformers builds Gemma 3n's vision tower (MobileNetV5) with timm, which imports torchvision at import time;
    # PyPI's torchvision for torch 2.13 is the CUDA build (its _C.so links libtorch_cuda.so), so with the CPU torch
    # the tests run no Gemma3nForConditionalGeneration can be built and no export of it checked
    "gemma3n": Quirks(refused="transformers builds Gemma 3n's vision tower with timm, which needs torchvision; with "
                              "the CPU torch 2.13 the tests run, PyPI's torchvision 0.28 (a CUDA build: its ops need "
                              "libtorch_cuda) does not import, so no tiny Gemma3nForConditionalGeneration is built and "
                              "no export checked"),
    "mimo_v2_flash": Quirks(standard_projections=False, window_field="sliding_window_size", rope_theta_by_layer_type={
        "full_attention": "rope_theta", "sliding_attention": "swa_rope_theta"}),
    "kimi_linear": Quirks(hub_renames=((r"\.block_sparse_moe\.((gate|up|down)_proj)\.", r".mlp.\1."),),
                          standard_projections=False),
    # two different models under one name: mlx-lm's bailing_hybrid is Ling/Ring-linear (lightning attention), transformers'
    # BailingHybrid's linear layers are Kimi delta attention; the tiny model's tensors show it
    "bailing_hybrid": Quirks(refused="mlx-lm's bailing_hybrid linear layers are lightning attention (fused "
                                     "query_key_value, per-head decay slopes, g_proj + grouped RMSNorm); transformers' "
                                     "BailingHybrid linear layers are Kimi delta attention (q/k/v_proj, short conv, "
                                     "forget gate A_log/dt_bias, b_proj): another architecture, so no checkpoint loads "
                                     "in both"),
    # transformers 5.24's LongcatFlashExperts sizes gate_up_proj for routed + zero experts but down_proj for routed ones
    "longcat_flash": Quirks(refused="transformers 5.24's LongcatFlashExperts sizes gate_up_proj for n_routed_experts + "
                                    "zero_expert_num experts (down_proj for n_routed_experts); hub checkpoints and "
                                    "mlx-lm hold gate/up for the routed experts only, so transformers does not load a "
                                    "checkpoint mlx-lm reads (size mismatch), and saves gate/up experts mlx-lm rejects"),
    "muse_spark": Quirks(refused="mlx-lm converts each residual gate g of muse_spark into alpha = sqrt(max(sigmoid(-g/0.3) "
                                 "* (1 + sigmoid(g/0.3)), 1e-3)) and beta = sigmoid(g/0.3) at load time; the derived "
                                 "rules state moved, split, transposed or shifted elements only, so the gates have no "
                                 "rule back"),
    "muse_glimmer": Quirks(refused="mlx-lm's muse_glimmer sanitize drops the vision tower only under top-level names "
                                   "(vision_tower., vision_adapter., vision_projection.); transformers' "
                                   "MuseGlimmerForConditionalGeneration saves and loads it as model.vision_* (no "
                                   "conversion mapping), which mlx-lm's strict load rejects, so no checkpoint loads in "
                                   "both with its vision tower"),
    "nanochat": Quirks(refused="mlx-lm's nanochat reads the original nanochat layout (transformer.h.{}.attn.c_q, "
                               "mlp.c_fc, wte; no sanitize), transformers' NanoChat saves and loads its own "
                               "(model.layers.{}.self_attn.q_proj, mlp.fc1, embed_tokens) with no conversion mapping "
                               "between them, so no checkpoint loads in both and no rule can be traced"),
    "bitnet": Quirks(refused="mlx-lm's bitnet runs every projection as BitLinear, a Metal kernel (mx.fast.metal_kernel: "
                             "'No Metal back-end' on CPU and CUDA), and mlx-lm's LoRA cannot wrap BitLinear (not an "
                             "nn.Linear, no to_lora), so no adapter on a projection exists to export and no parity can "
                             "be checked off a Mac"),
    # transformers' save reverses its vision-tower renaming blocks -> layers on the language model too; hub Kimi-K2.5
    # keeps language_model.model.layers (what mlx-lm reads), which transformers also loads
    "kimi_k25": Quirks(hub_renames=((r"^language_model\.model\.blocks\.", "language_model.model.layers."),
                                    (r"^model\.mm_projector\.pre_norm\.", "mm_projector.pre_norm."))),
    "olmo": Quirks(refused="mlx-lm's olmo module exits on import without the ai2-olmo package (an availability probe), "
                           "and reads the original OLMo layout and config (model.transformer.blocks.{}.att_proj, "
                           "d_model, n_layers); transformers' Olmo is the converted one (model.layers.{}.self_attn."
                           "q_proj, hidden_size) with no conversion mapping, so no checkpoint loads in both"),
    # mlx-lm's llama4_text attends to the whole context in every layer (no chunked attention); transformers chunks
    # the rope layers by attention_chunk_size (8192 on the hub): found by a parity probe longer than a chunk
    "llama4_text": Quirks(attention="full", mlx_ignores=("attention_chunk_size",)),
    # mlx-lm serves model_type minimax with MiniMax-M2's module (it remaps minimax_m2 to it): sigmoid routing, q/k
    # norms, no lightning attention. transformers' minimax is MiniMax-Text-01, another architecture.
    "minimax": Quirks(refused="mlx-lm's minimax module is MiniMax-M2's architecture (minimax_m2 exports); "
                              "transformers' minimax is MiniMax-Text-01 (lightning attention), which mlx-lm does not "
                              "implement, so no tiny model of it loads in mlx-lm"),
    # mlx-lm's granitemoehybrid applies rope unless position_embedding_type is "nope"; transformers' null means none
    "granitemoehybrid": Quirks(null_as={"position_embedding_type": "rope"}),
    # mlx-lm's FalconH1 sanitize folds every muP multiplier into the weights (key_multiplier matches no tensor name
    # there, and attention_in_multiplier only q/k, not v, as transformers scales the attention's input): MLX
    # computes with none of them
    "falcon_h1": Quirks(folded_multipliers=("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier",
                                            "attention_out_multiplier", "key_multiplier", "ssm_in_multiplier",
                                            "ssm_out_multiplier", "mlp_multipliers", "ssm_multipliers")),
    # mlx-lm's cohere2 picks global layers by sliding_window_pattern (i % p == p - 1), not layer_types
    "cohere2": Quirks(attention="pattern"),
}
