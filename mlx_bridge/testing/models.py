"""Factories for tiny random models of each supported architecture (tests, benchmarks, demo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..archs.hub import to_hub_transposed, to_mxfp4_hub
from ..archs.registry import describe
from ..archs.tiny import TINY, hub_style, tiny_config

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

ARCH_CONFIGS = TINY  # per-type tiny configs live in the registry (mlx_bridge.archs.tiny)


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
                  tokenizer_dir: str | os.PathLike | None = None, mxfp4: bool = False, **overrides) -> Path:
    """Save a random transformers model of `model_type` (2 layers, hidden 64) plus tokenizer to `out`.

    Norm weights are randomised too, so a mapping error in them shows up in the logits. The tokenizer is
    the tiny word-level one, or the one in `tokenizer_dir` (e.g. a real vocabulary for GGUF tests).
    `mxfp4=True` stores gpt_oss's experts as gpt-oss checkpoints do (`archs.hub.to_mxfp4_hub`), the only
    layout mlx-lm reads; transformers loads either.

    Example:
        >>> tiny_hf_model("/tmp/hf-llama", "llama")  # doctest: +SKIP
        PosixPath('/tmp/hf-llama')
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    out = Path(out)
    if tokenizer_dir is None:
        tok = tiny_tokenizer(out)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out))
    arch = describe(model_type)  # refused types too: deploy tests build tiny models of types export refuses
    cfg = tiny_config(model_type, **overrides)  # overrides win over the arch defaults
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if "vocab_size_per_layer_input" in (cfg.get("text_config") or cfg):  # gemma3n / gemma4: the same vocabulary
        ids["vocab_size_per_layer_input"] = len(tok)
    cfg.update(ids)
    cfg.setdefault("pad_token_id", tok.pad_token_id)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].update(ids, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if arch.hf_auto == "causal_lm" else AutoModelForImageTextToText
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:  # random norms: a wrong mapping must show
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if arch.quirks.zero_centred_norms else 1.0))
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):  # clipped linears' bounds
            if t.is_floating_point() and torch.isinf(t).any():  # (Gemma 3n/4 towers) init at +-inf; hub ones are finite
                t.copy_(torch.where(t > 0, 8.0, -8.0))
        for name, b in model.named_buffers():  # DeepSeek-V3-style routing bias (a buffer): a dropped one must show
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    model = model.to(getattr(torch, dtype))
    (model.base_model if arch.quirks.hub_saves_base_model else model).save_pretrained(
        str(out), save_original_format=not arch.quirks.hub_saves_fused)
    to_hub_transposed(out, model_type)
    p = out / "config.json"
    c = hub_style(model_type, json.loads(p.read_text()), config)
    if mxfp4:
        c = to_mxfp4_hub(out, c)
    p.write_text(json.dumps(c, indent=2, sort_keys=True))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(str(out))
    return out


def mlx_convert(hf_dir: str | os.PathLike, out: str | os.PathLike, *, quantize: bool = False, bits: int = 4,
                group_size: int = 64, mode: str = "affine", dtype: str | None = None, quant_predicate=None) -> Path:
    """Convert with mlx-lm's own `convert` (the layout users have); return `out`."""
    from mlx_lm import convert

    convert(str(hf_dir), str(out), quantize=quantize, q_group_size=group_size if quantize else None,
            q_bits=bits if quantize else None, q_mode=mode, dtype=dtype, quant_predicate=quant_predicate)
    return Path(out)


def read_config(d: str | os.PathLike) -> dict:
    return json.loads((Path(d) / "config.json").read_text())
