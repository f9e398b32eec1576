"""Model types whose transformers config class only renames keys: `gguf_config` without importing transformers.

`hparams.gguf_config` resolves a config with transformers' own config class, which costs importing
transformers and torch (about 3 CPU seconds, a third of a TinyLlama q8_0 export). For most types the
class adds nothing `gguf_config` reads: no GPT-2 `n_inner`, none of the keys it fills from class
defaults, no computed MLP layer types, no rotary fraction. Those types and their `attribute_map` are
read from the installed transformers by `derive()` (scripts/derive_gguf_configs.py writes
plain_configs.json; tests/test_gguf_stream.py fails on drift and checks both paths agree), and
`resolve` applies the aliases to a config of such a type that sets none of those keys either.

Example:
    >>> resolve({"model_type": "llama", "num_hidden_layers": 2})["num_hidden_layers"]
    2
    >>> resolve({"model_type": "gpt2", "n_layer": 2}) is None  # GPT-2's n_inner: transformers decides
    True
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

DATA = Path(__file__).with_name("plain_configs.json")
# keys `gguf_config` fills from the class when config.json leaves them out
RESOLVED = ("layer_norm_epsilon", "mixer_rms_eps", "conv_kernel", "state_size", "time_step_rank", "use_bias",
            "num_heads", "n_groups", "num_hidden_layers")  # NemotronH: num_hidden_layers from its layer types
# what `gguf_config` reads from the class beyond its attribute_map (num_hidden_layers: every config sets it)
CLASS_KEYS = ("n_inner", "mlp_layer_types", "partial_rotary_factor", "rotary_pct",
              *(k for k in RESOLVED if k != "num_hidden_layers"))


@functools.cache
def _table() -> dict[str, dict[str, str]]:
    return json.loads(DATA.read_text())["plain"]


def _sets_class_keys(cfg: dict) -> bool:
    """Whether `cfg` sets a key the class may compute from (or a rotary fraction nested in its rope dict)."""
    rope = [cfg.get(k) for k in ("rope_parameters", "rope_scaling") if isinstance(cfg.get(k), dict)]
    return any(k in cfg for k in CLASS_KEYS) or any("partial_rotary_factor" in r for r in rope)


def resolve(cfg: dict) -> dict | None:
    """`cfg` with the standard names filled from the class's aliases, or None when transformers must decide
    (a type not in the table, a config setting one of `CLASS_KEYS`, or without num_hidden_layers)."""
    aliases = _table().get(cfg.get("model_type"))
    if aliases is None or _sets_class_keys(cfg):
        return None
    out = dict(cfg)
    for std, alias in aliases.items():
        if out.get(std) is None and out.get(alias) is not None:
            out[std] = out[alias]
    return out if out.get("num_hidden_layers") is not None else None


def model_types() -> set[str]:
    """What `gguf_config` is given: the GGUF types, and the language models' types of the multimodal ones."""
    from .archs import GGUF_ARCHS

    return set(GGUF_ARCHS) | {t for ga in GGUF_ARCHS.values() for t in (ga.text or {})}


def derive(model_types) -> dict:
    """{"transformers": version, "plain": {model_type: attribute_map}} for the `model_types` whose config
    class, built with its defaults, has no `n_inner` attribute, none of `CLASS_KEYS` set, and no rotary
    fraction in its rope parameters."""
    import transformers
    from transformers import AutoConfig

    plain = {}
    for mt in sorted(model_types):
        try:
            conf = AutoConfig.for_model(mt)
        except (KeyError, ValueError):  # not a transformers type
            continue
        rope = getattr(conf, "rope_parameters", None) or {}
        if (hasattr(conf, "n_inner") or any(getattr(conf, k, None) is not None for k in CLASS_KEYS)
                or rope.get("partial_rotary_factor") is not None):
            continue
        plain[mt] = dict(sorted(conf.attribute_map.items()))
    return {"transformers": transformers.__version__, "plain": plain}
