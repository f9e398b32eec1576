"""Factories for tiny random models of each supported architecture (tests, benchmarks, demo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

WORDS = (
    "the a an is are was to of and in on for with you I it this that what how why when who "
    "give tips three one two four five six seven eight nine ten zero plus minus times equals answer "
    "question reverse sort list word number yes no hello hi please thanks good bad day night "
    "staying healthy water sleep eat walk read write code model data train test"
).split()
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# Per-arch config overrides on top of the shared tiny shape (2 layers, hidden 64).
_BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
)
ARCH_CONFIGS: dict[str, dict] = {
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
}
# More dense (and one MoE) types whose mlx-lm layout is the HF layout (export tests run them all).
ARCH_CONFIGS.update({
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
    "seed_oss": {"head_dim": 16},
    "stablelm": {},
    "starcoder2": {},
})
# types whose mlx-lm ModelArgs require a top-level `rope_theta` (hub configs, written by transformers v4, have it)
_TOP_ROPE_THETA = ("ernie4_5", "exaone4", "granite", "helium", "olmo3", "stablelm")


def tiny_tokenizer(out: str | os.PathLike) -> "object":
    """Write a word-level fast tokenizer with a chat template to `out`; return it.

    Example:
        >>> tok = tiny_tokenizer("/tmp/tok")  # doctest: +SKIP
        >>> tok("give three tips").input_ids  # doctest: +SKIP
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [str(d) for d in range(10)] + list(".,?!:;-+=*/()"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return tok


def tiny_hf_model(out: str | os.PathLike, model_type: str = "llama", dtype: str = "float32", seed: int = 0,
                  tokenizer_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """Save a random transformers model of `model_type` (2 layers, hidden 64) plus tokenizer to `out`.

    Norm weights are randomised too, so a mapping error in them shows up in the logits. The tokenizer is
    the tiny word-level one, or the one in `tokenizer_dir` (e.g. a real vocabulary for GGUF tests).

    Example:
        >>> tiny_hf_model("/tmp/hf-llama", "llama")  # doctest: +SKIP
        PosixPath('/tmp/hf-llama')
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    if tokenizer_dir is None:
        tok = tiny_tokenizer(out)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out))
    cfg = {**_BASE, **ARCH_CONFIGS[model_type], **overrides}  # overrides win over the arch defaults
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.setdefault("pad_token_id", tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:  # random norms: a wrong mapping must show
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if model_type.startswith("gemma") else 1.0))
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    _hub_style_config(out, model_type)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(str(out))
    return out


def _hub_style_config(out: Path, model_type: str) -> None:
    """Add the v4-style fields that hub checkpoints of these archs carry and mlx-lm requires.

    transformers v5 writes `num_local_experts` and nested `rope_parameters` only; Qwen-MoE checkpoints on
    the hub (written by v4) have `num_experts` and a top-level `rope_theta`, which mlx-lm's qwen MoE
    models need. Gemma-3 hub configs carry `sliding_window_pattern`, which mlx-lm reads (v5 keeps only
    `layer_types`). Several other types need a top-level `rope_theta` (`_TOP_ROPE_THETA`).
    """
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    if model_type == "gemma3_text":  # hub gemma3 configs carry it; mlx-lm reads it (default 6 > 2 layers)
        cfg.setdefault("sliding_window_pattern", ARCH_CONFIGS[model_type]["sliding_window_pattern"])
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if model_type in _TOP_ROPE_THETA:
        rp = cfg.get("rope_parameters") or {}
        rp = rp.get("full_attention", rp)  # per-layer-type rope parameters (olmo3)
        cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if model_type == "stablelm":
            cfg.setdefault("partial_rotary_factor", rp.get("partial_rotary_factor", 0.25))
        if model_type == "exaone4":  # hub exaone4 configs: "sliding_window_pattern": "LLLG"
            cfg.setdefault("rope_scaling", None)
            cfg["sliding_window_pattern"] = "".join("G" if t == "full_attention" else "L" for t in cfg["layer_types"])
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if model_type not in ("qwen3_moe", "qwen2_moe"):
        return
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def mlx_convert(hf_dir: str | os.PathLike, out: str | os.PathLike, *, quantize: bool = False, bits: int = 4,
                group_size: int = 64, mode: str = "affine", dtype: str | None = None, quant_predicate=None) -> Path:
    """Convert with mlx-lm's own `convert` (the layout users have); return `out`."""
    from mlx_lm import convert

    convert(str(hf_dir), str(out), quantize=quantize, q_group_size=group_size if quantize else None,
            q_bits=bits if quantize else None, q_mode=mode, dtype=dtype, quant_predicate=quant_predicate)
    return Path(out)


def read_config(d: str | os.PathLike) -> dict:
    return json.loads((Path(d) / "config.json").read_text())
