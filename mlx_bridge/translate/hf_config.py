"""config.json, generation_config.json, tokenizer and model card of an export.

The exported config states what MLX computed with: mlx-lm reads some fields differently from
transformers (it ignores transformers-v5 `rope_parameters` for most archs and falls back to its own
`rope_theta` default; it defaults `tie_word_embeddings` per arch; it ignores a bare `sliding_window` in
llama/mistral). `effective_config` resolves every such field to MLX's value and writes it explicitly,
both the v4 way (top-level `rope_theta`/`rope_scaling`) and the v5 way (`rope_parameters`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..archs import Arch
from ..archs.quirks import ROPE_FORCES
from .source import TOKENIZER_FILES

DROP = ("quantization", "quantization_config", "_name_or_path")


def effective_config(cfg: dict, arch: Arch, dtype: str) -> tuple[dict, list[str]]:
    """(config for the export, notes on every value changed to what MLX used).

    Example:
        >>> from mlx_bridge.archs import get_arch
        >>> c, notes = effective_config({"model_type": "mixtral", "rope_parameters": {"rope_type": "default",
        ...     "rope_theta": 10000.0}}, get_arch({"model_type": "mixtral"}), "float32")
        >>> c["rope_parameters"]["rope_theta"], c["rope_theta"]
        (1000000.0, 1000000.0)
    """
    c = {k: v for k, v in cfg.items() if k not in DROP}
    notes = []
    c["architectures"] = [arch.architecture]
    c["torch_dtype"] = c["dtype"] = dtype
    for k, v in arch.config_defaults.items():
        if k not in cfg and k not in ("rope_theta", "rope_scaling"):
            c[k] = v
            notes.append(f"{k}: absent from config.json; MLX used its default {v!r}")
    for k, v in arch.mlx_forces.items():
        if cfg.get(k) != v:
            notes.append(f"{k}: mlx-lm computes {arch.model_type} with {v!r} whatever config.json says "
                         f"({cfg.get(k)!r}); the export states {v!r}")
        c[k] = v
    for k, v in arch.quirks.null_as.items():
        if cfg.get(k) is None:
            c[k] = v
            notes.append(f"{k}: null in config.json; mlx-lm computes {arch.model_type} with {v!r}, which the export states")
    for t in arch.quirks.unused:
        notes.append(f"{t}: mlx-lm loads it but computes without it; the export writes zeros (what MLX computed)")
    if (f := arch.quirks.window_field) and cfg.get(f) is not None:
        c["sliding_window"] = c.pop(f)
        notes.append(f"{f}: mlx-lm attends to the last {cfg[f]} tokens; transformers reads {f} as a window one token "
                     f"longer, so the export states sliding_window={cfg[f]} and leaves {f} out")
    if arch.quirks.folded_multipliers:
        _multipliers_folded(cfg, c, arch, notes)
    for k in arch.mlx_ignores:
        if cfg.get(k) is not None:
            c[k] = None
            notes.append(f"{k}: {cfg[k]!r} is ignored by mlx-lm for {arch.model_type}; MLX computed without it")
    if not arch.reads_rope_parameters:
        _rope_as_mlx(cfg, c, arch, notes)
    elif "rope_theta" not in c and isinstance(c.get("rope_parameters"), dict) and "rope_theta" in c["rope_parameters"]:
        c["rope_theta"] = c["rope_parameters"]["rope_theta"]  # for readers bundling transformers v4
    _text_rope_as_mlx(c, arch, notes)
    _rope_forces(c, arch, notes)
    if arch.quirks.attention in LAYER_PATTERNS:
        LAYER_PATTERNS[arch.quirks.attention](cfg, c, arch, notes)
    return c, notes


def _multipliers_folded(cfg: dict, c: dict, arch: Arch, notes: list[str]) -> None:
    """The multipliers mlx-lm multiplied into the weights, stated as 1 (lists: 1 each). A tied head is the embedding
    times `embedding_multiplier` in MLX, scaled back by lm_head / embedding at the output: that ratio stays.

    Example:
        >>> from mlx_bridge.archs import get_arch
        >>> cfg = {"model_type": "falcon_h1", "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5,
        ...        "mlp_multipliers": [0.5, 2.0], "tie_word_embeddings": True}
        >>> c = dict(cfg); _multipliers_folded(cfg, c, get_arch(cfg), [])
        >>> c["embedding_multiplier"], c["lm_head_multiplier"], c["mlp_multipliers"]
        (1.0, 0.25, [1.0, 1.0])
    """
    for k in arch.quirks.folded_multipliers:
        v = cfg.get(k)
        if v is None:
            continue
        one = [1.0] * len(v) if isinstance(v, list) else 1.0
        if k == "lm_head_multiplier" and cfg.get("tie_word_embeddings"):
            one = float(v) / float(cfg.get("embedding_multiplier") or 1.0)
        if v != one:
            notes.append(f"{k}: mlx-lm multiplied {v!r} into the weights and computes without it; the export states {one!r}")
        c[k] = one


def _text_rope_as_mlx(c: dict, arch: Arch, notes: list[str]) -> None:
    """A multimodal wrapper's text model: mlx-lm reads `text_config` with its text ModelArgs, which (for
    qwen2_vl, qwen2_5_vl) has a top-level `rope_theta` with its own default and no `rope_parameters`."""
    tc, d = c.get("text_config"), arch.mlx_text_defaults
    if not isinstance(tc, dict) or "rope_parameters" in d or "rope_theta" not in d:
        return
    tc = c["text_config"] = dict(tc)
    theta = tc.get("rope_theta", d["rope_theta"])
    rp = tc.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_theta") != theta:
        notes.append(f"rope: text_config's rope_parameters {rp} is not read by mlx-lm for {arch.model_type}; MLX "
                     f"computed with rope_theta={theta!r}, which the export states")
        tc["rope_parameters"] = {**rp, "rope_theta": theta}
    tc["rope_theta"] = theta


def _rope_forces(c: dict, arch: Arch, notes: list[str]) -> None:
    """State the rope settings mlx-lm computes with whatever config.json says (`ROPE_FORCES`)."""
    for key in ("rope_parameters", "rope_scaling"):
        rp = c.get(key)
        if not isinstance(rp, dict):
            continue
        if (rp.get("rope_type") or rp.get("type")) in ("longrope", "su") and "long_factor" in rp:
            rp = c[key] = _longrope_as_mlx(c, rp, notes if key == "rope_parameters" else [])
        for k, v in ROPE_FORCES.get(rp.get("rope_type") or rp.get("type"), {}).items():
            if rp.get(k, v) != v and key == "rope_parameters":
                notes.append(f"rope: mlx-lm computes {rp.get('rope_type')} rope with {k}={v!r} whatever config.json "
                             f"says ({rp[k]!r}); the export states {v!r}")
            c[key] = {**rp, k: v}


def _longrope_as_mlx(c: dict, rp: dict, notes: list[str]) -> dict:
    """mlx-lm's SuScaledRoPE rotates with the long factors at every length and scales by `long_mscale`
    (or sqrt(1 + ln(f) / ln(original)), f = max / original positions); transformers takes the short factors
    (phimoe: and `short_mscale`) up to `original_max_position_embeddings`. State MLX's choice for both.

    Example:
        >>> c = {"max_position_embeddings": 64, "original_max_position_embeddings": 16}
        >>> rp = _longrope_as_mlx(c, {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [4.0],
        ...                           "short_mscale": 1.1, "long_mscale": 1.3}, [])
        >>> rp["short_factor"], rp["short_mscale"], rp["long_mscale"]
        ([4.0], 1.3, 1.3)
    """
    out = {**rp, "short_factor": rp["long_factor"]}
    if "short_mscale" in rp or "long_mscale" in rp:
        orig = rp.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
        f = (c.get("max_position_embeddings") or orig) / orig
        scale = rp.get("long_mscale") or (1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig)))
        out.update(short_mscale=scale, long_mscale=scale)
    if out != rp:
        notes.append("rope: mlx-lm's longrope uses the long factors (and one scale) at every length; the export "
                     "states them as the short ones too")
    return out


def all_full_attention(cfg: dict, c: dict, arch: Arch, notes: list[str]) -> None:
    """mlx-lm implements no sliding window for this arch: every layer attends to the whole context.

    The export says so in every way transformers (and engines) read it: `layer_types` all full,
    `use_sliding_window` false, and `sliding_window` null where the model class allows it (gemma2 builds a
    sliding mask regardless, so its window value stays, unused).
    """
    q = arch.quirks
    if q.honours_layer_types and cfg.get("layer_types"):
        return  # mlx-lm's llama honours layer_types (and then the window), as transformers does
    n = cfg.get("num_hidden_layers", 0)
    types = cfg.get("layer_types") or []
    windowed = any(t != "full_attention" for t in types) or (
        cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True))
    if windowed:
        notes.append(f"attention: mlx-lm has no sliding window for {arch.model_type} and attends to the whole context "
                     f"in every layer; the export states full attention (sliding_window {cfg.get('sliding_window')!r} dropped)")
    if types or q.states_layer_types:
        c["layer_types"] = ["full_attention"] * n
    if "use_sliding_window" in cfg or q.has_use_sliding_window:
        c["use_sliding_window"] = False
    if not q.keeps_sliding_window:
        c["sliding_window"] = None


def gemma3_pattern(cfg: dict, c: dict, arch: Arch, notes: list[str]) -> None:
    """mlx-lm's gemma3 picks global layers by `sliding_window_pattern` (i % p == p - 1), not `layer_types`."""
    n = cfg.get("num_hidden_layers", 0)
    p = cfg.get("sliding_window_pattern", arch.mlx_defaults["sliding_window_pattern"])
    types = ["full_attention" if i % p == p - 1 else "sliding_attention" for i in range(n)]
    if cfg.get("layer_types") not in (None, types):
        notes.append(f"layer_types: mlx-lm derives them from sliding_window_pattern={p}; the export states those")
    c["layer_types"] = types
    c["sliding_window_pattern"] = p


# Quirks.attention -> named fix of the attention layout to what mlx-lm computes
LAYER_PATTERNS = {"pattern": gemma3_pattern, "full": all_full_attention}


def _rope_as_mlx(cfg: dict, c: dict, arch: Arch, notes: list[str]) -> None:
    theta = cfg.get("rope_theta", arch.mlx_defaults.get("rope_theta"))
    if theta is None:
        return
    scaling = cfg.get("rope_scaling") or None
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    params = {"rope_type": rope_type, "rope_theta": theta}
    # a v5-style scaling dict may carry its own rope_theta: mlx-lm reads the top-level one (or its default)
    params.update({k: v for k, v in (scaling or {}).items() if k not in ("type", "rope_type", "rope_theta")})
    old = cfg.get("rope_parameters")
    if old is not None and (old.get("rope_theta") != theta or (old.get("rope_type") or "default") != rope_type):
        notes.append(f"rope: config.json's rope_parameters {old} is not read by mlx-lm for {arch.model_type}; "
                     f"MLX computed with rope_theta={theta!r}, rope_type={rope_type!r}, which the export states")
    c["rope_theta"] = theta
    c["rope_parameters"] = params
    if arch.quirks.rope_theta_by_layer_type:  # per layer type, each with the theta mlx-lm read for it
        prf = {"partial_rotary_factor": cfg["partial_rotary_factor"]} if "partial_rotary_factor" in cfg else {}
        c["rope_parameters"] = {t: {**params, "rope_theta": cfg.get(f, theta), **prf}
                                for t, f in arch.quirks.rope_theta_by_layer_type.items()}
    if scaling is None:
        c.pop("rope_scaling", None)
    else:  # what MLX computed, for readers of the v4 field too
        c["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def write_config(out: Path, cfg: dict) -> None:
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files present in `src`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def write_generation_config(src: Path, out: Path, cfg: dict) -> None:
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
        return
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
