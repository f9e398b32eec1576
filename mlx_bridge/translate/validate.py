"""Check a model's config.json values before anything is built from them.

Types (an int where an int belongs, never a string or a bool), ranges (positive sizes, finite epsilons)
and sizes against the weights on disk: the number of layers, the vocabulary and the projection shapes
the config implies must be the ones the safetensors headers hold. A config that claims a billion
layers is refused here, before export, load or train allocates anything for them.

Used by the exporter (`plan.build_plan`), the loader (`deploy.loader.load`) and the trainer
(`train.model.load_base`); numpy-free, it reads only headers.

Example:
    >>> check_config({"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1000000000},
    ...              {"model.embed_tokens.weight": (100, 8), "model.layers.0.mlp.up_proj.weight": (16, 8)})
    ['num_hidden_layers=1000000000 but the weights have 1 layer (0..0)']
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..errors import raise_all

# keys that must be positive ints when present (None allowed only where OPTIONAL says so)
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "max_position_embeddings", "head_dim", "num_local_experts", "num_experts",
         "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "sliding_window",
         "max_window_layers", "num_nextn_predict_layers")
OPTIONAL = {"head_dim", "sliding_window", "num_key_value_heads", "max_window_layers", "num_local_experts",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "num_nextn_predict_layers"}
ZERO_OK = {"num_nextn_predict_layers", "max_window_layers", "num_experts", "num_local_experts", "sliding_window",
           "shared_expert_intermediate_size", "moe_intermediate_size"}
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
FLOATS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "partial_rotary_factor")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_qk_norm", "norm_topk_prob")
OBJECTS = ("rope_scaling", "rope_parameters", "quantization", "quantization_config")
MAX_CONTEXT = 1 << 27  # 134M positions: beyond any released model; a larger value is a typo
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# per-layer tensor (after model.layers.N.) -> (rows, cols) as config expressions
PROJECTIONS = {
    "self_attn.q_proj.weight": ("heads*head_dim", "hidden_size"),
    "self_attn.k_proj.weight": ("kv_heads*head_dim", "hidden_size"),
    "self_attn.v_proj.weight": ("kv_heads*head_dim", "hidden_size"),
    "self_attn.o_proj.weight": ("hidden_size", "heads*head_dim"),
    "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_types(cfg: dict) -> list[str]:
    """Problems with the types and ranges of the config's values (nothing about the weights).

    Example:
        >>> check_types({"num_hidden_layers": "4", "vocab_size": None, "tie_word_embeddings": "yes"})
        ['vocab_size: null, expected a positive integer', "num_hidden_layers: '4' (str), expected a positive integer", "tie_word_embeddings: 'yes' (str), expected true or false"]
    """
    out = []
    if "model_type" in cfg and not isinstance(cfg["model_type"], str):
        out.append(f"model_type: {cfg['model_type']!r} ({type(cfg['model_type']).__name__}), expected a string")
    for k in SIZES:
        if k not in cfg or (cfg[k] is None and k in OPTIONAL):
            continue
        v = cfg[k]
        ok = _is_int(v) and (v > 0 or (v == 0 and k in ZERO_OK))
        if k == "intermediate_size" and isinstance(v, list):  # per-layer sizes (e.g. gemma3n)
            ok = bool(v) and all(_is_int(x) and x > 0 for x in v)
        if not ok:
            out.append(f"{k}: null, expected a positive integer" if v is None else
                       f"{k}: {v!r} ({type(v).__name__}), expected a positive integer")
    mpe = cfg.get("max_position_embeddings")
    if _is_int(mpe) and mpe > MAX_CONTEXT:
        out.append(f"max_position_embeddings: {mpe} is beyond any model (limit {MAX_CONTEXT})")
    for k in POSITIVE_FLOATS + FLOATS:
        if k not in cfg or cfg[k] is None:
            continue
        v = cfg[k]
        if not _is_num(v) or not math.isfinite(v) or (k in POSITIVE_FLOATS and v <= 0):
            want = "a positive finite number" if k in POSITIVE_FLOATS else "a finite number"
            out.append(f"{k}: {v!r} ({type(v).__name__}), expected {want}")
    for k in BOOLS:
        if k in cfg and cfg[k] is not None and not isinstance(cfg[k], bool):
            out.append(f"{k}: {cfg[k]!r} ({type(cfg[k]).__name__}), expected true or false")
    for k in OBJECTS:
        if k in cfg and cfg[k] is not None and not isinstance(cfg[k], (dict, bool)):
            out.append(f"{k}: {cfg[k]!r} ({type(cfg[k]).__name__}), expected an object")
    h, n = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if _is_int(h) and _is_int(n) and h > 0 and n > 0 and h % n:
        out.append(f"num_key_value_heads: {n} does not divide num_attention_heads {h}")
    return out


def _sizes(cfg: dict) -> dict[str, int | None]:
    h, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    hd = cfg.get("head_dim") or (h // heads if _is_int(h) and _is_int(heads) and heads else None)
    kv = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size")
    return {"hidden_size": h, "heads*head_dim": heads * hd if heads and hd else None,
            "kv_heads*head_dim": kv * hd if kv and hd else None,
            "intermediate_size": inter if _is_int(inter) else None}


def check_against_weights(cfg: dict, shapes: dict[str, tuple]) -> list[str]:
    """Problems where the config implies sizes the weights do not have.

    `shapes`: tensor name -> shape, with `None` for a dimension not known (a packed quantized axis).
    Only called with configs whose types passed `check_types`.
    """
    out = []
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    n = cfg.get("num_hidden_layers")
    if layers and _is_int(n) and (len(layers) != n or min(layers) != 0 or max(layers) != n - 1):
        out.append(f"num_hidden_layers={n} but the weights have {len(layers)} layer{'s' * (len(layers) != 1)} "
                   f"({min(layers)}..{max(layers)})")
    emb = shapes.get("model.embed_tokens.weight")
    if emb is not None and len(emb) == 2:
        for k, got in (("vocab_size", emb[0]), ("hidden_size", emb[1])):
            if _is_int(cfg.get(k)) and got is not None and cfg[k] != got:
                out.append(f"{k}={cfg[k]} but model.embed_tokens.weight is {list(emb)}")
    if not _standard_projections(cfg.get("model_type")):
        return out
    want = _sizes(cfg)
    bad: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        m = _LAYER.match(key)
        spec = PROJECTIONS.get(key[m.end():]) if m else None
        if spec is None or len(shape) != 2:
            continue
        expect = [want[e] for e in spec]
        if any(w is not None and g is not None and w != g for w, g in zip(expect, shape)):
            bad.setdefault(key[m.end():], []).append(
                f"{key} is {list(shape)}, the config implies {[w if w is not None else '?' for w in expect]} "
                f"({spec[0]} x {spec[1]})")
    for problems in bad.values():
        out.append(problems[0] + (f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""))
    return out


def _standard_projections(model_type) -> bool:
    from ..archs.quirks import QUIRKS  # the registry's facts (json-free, numpy-free)

    q = QUIRKS.get(model_type) if isinstance(model_type, str) else None
    return q is None or q.standard_projections


def check_config(cfg: dict, shapes: dict[str, tuple]) -> list[str]:
    """Every problem of `check_types`, then (when the types are right) of `check_against_weights`."""
    problems = check_types(cfg)
    return problems or check_against_weights(cfg, shapes)


def header_shapes(files: list[Path]) -> dict[str, tuple]:
    """Tensor name -> shape from safetensors headers (validated; no data read), packed quantized
    axes (a `.scales` beside the weight) as None."""
    from ..formats.safetensors import read_header

    shapes: dict[str, tuple] = {}
    for f in files:
        shapes.update({k: t.shape for k, t in read_header(f)[0].items()})
    for k in [k for k in shapes if k.endswith(".scales")]:
        w = k[: -len(".scales")] + ".weight"
        if w in shapes:
            shapes[w] = (*shapes[w][:-1], None)
    return shapes


def validate_model_dir(cfg: dict, files: list[str | os.PathLike], where: str) -> None:
    """Raise one `BridgeError` (naming `where`, the config.json) if the config is wrong or the weights
    in `files` cannot back it."""
    raise_all(check_config(cfg, header_shapes([Path(f) for f in files])), where)
