"""The two derivations that need more than a ramp trace (used by `derive.py`): gpt_oss's MXFP4 experts traced
digit by digit through mlx-lm's own loading, and the HF modules PEFT refuses to target, asked of PEFT.

Example:
    >>> peft_unwrappable(gpt_oss_tiny_model)  # doctest: +SKIP
    {'model.layers.{}.mlp.experts': 'GptOssExperts', 'model.layers.{}.mlp.router': 'GptOssTopKRouter'}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .derive import STEP, Refused, _kinds
from .registry import template


def mlx_loaded_mxfp4(out: Path, layout: dict) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """`mlx_sanitized` for a type whose hub checkpoints hold MXFP4 experts (gpt_oss): mlx-lm reads only
    that layout, and a ramp value does not survive MXFP4. So each expert element's checkpoint index is sent
    through in base-8 digits, one pass a digit: element k holds E2M1[digit] (0, 0.5, ... 6: exact in MXFP4,
    with each group's scale chosen from its values), the checkpoint is packed as the hub does
    (`hub.to_mxfp4_hub`), mlx-lm's own `load_model` reads it (sanitize, then its MXFP4 layers), and
    `mx.dequantize` of every quantized MLX weight gives the digit back at the element's new place.
    The other tensors keep their ramps. Returns the MLX weights with each dequantized weight holding the
    ramp value of the checkpoint element it came from (scales gone), as `trace` reads them."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model
    from safetensors.numpy import load_file, save_file

    from .hub import E2M1, MXFP4_PARAMS, to_mxfp4_hub

    files = {f.name: load_file(str(f)) for f in sorted(out.glob("model*.safetensors"))}
    total = max(o + int(np.prod(s)) for o, s in layout.values())
    ids: dict[str, np.ndarray] = {}
    floats, kinds = {}, None
    for p in range(-(-int(total).bit_length() // 3)):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            for f in out.iterdir():
                if not f.name.startswith("model") and f.is_file():
                    shutil.copyfile(f, d / f.name)
            for name, ts in files.items():
                new = {}
                for k, v in ts.items():
                    if k.rsplit(".", 1)[-1] in MXFP4_PARAMS:
                        off, shape = layout[k]
                        v = E2M1[((off + np.arange(v.size)) >> (3 * p)) & 7].reshape(shape)
                    new[k] = v
                save_file(new, str(d / name), metadata={"format": "pt"})
            c = to_mxfp4_hub(d, json.loads((d / "config.json").read_text()))
            (d / "config.json").write_text(json.dumps(c))
            model, _ = load_model(d)  # strict: every parameter the model has, no other
            quantized = {n: m for n, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "mode")}
            if p == 0:
                kinds = _kinds(model)
                skip = {f"{n}.{leaf}" for n in quantized for leaf in ("weight", "scales", "biases")}
                floats = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters()) if k not in skip}
            for n, m in quantized.items():
                w = np.array(mx.dequantize(m.weight, m.scales, getattr(m, "biases", None), m.group_size, m.bits,
                                           mode=m.mode).astype(mx.float32))
                digit = np.searchsorted(E2M1, w)
                if np.any(digit >= len(E2M1)) or np.any(E2M1[np.minimum(digit, len(E2M1) - 1)] != w):
                    raise Refused(f"MLX tensor {n}.weight holds values computed from the checkpoint (not moved)")
                ids[f"{n}.weight"] = ids.get(f"{n}.weight", 0) + (digit.astype(np.int64) << (3 * p))
    return {**floats, **{k: STEP * (v + 1).astype(np.float64) for k, v in ids.items()}}, kinds


def peft_unwrappable(model, templates: set[str]) -> dict[str, str]:
    """Those of the HF module `templates` (the ones holding a weight an mlx-lm adapter can change) that PEFT's
    LoRA cannot target (`get_peft_model` with it fails: gpt_oss's router and stacked experts, Mamba's out_proj)
    -> the module's class. Asked of PEFT itself, once per template, on a copy of the tiny model (PEFT wraps
    some non-Linear routers, e.g. qwen3_moe's, through its parameter wrapper)."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    def wraps(names: list[str]) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules=names))
            return True
        except Exception:
            return False

    mats = [n for n, m in model.named_modules() if n and any(p.ndim >= 2 for p in m.parameters(recurse=False))]
    asked = [n for n in mats if template(n)[0] in templates]
    if not asked or wraps(asked):  # every one at once (most types): nothing to ask one by one
        return {}
    out, seen = {}, set()
    for name in asked:
        t = template(name)[0]
        if t in seen:
            continue
        seen.add(t)
        # alone, with its siblings, or with every module of its class (PEFT takes a gate_proj only with an up_proj,
        # which transformers may fuse with it)
        cls = type(model.get_submodule(name))
        siblings = [n for n in mats if n.rpartition(".")[0] == name.rpartition(".")[0]
                    and type(model.get_submodule(n)) is cls]
        same = [n for n in mats if type(model.get_submodule(n)) is cls]  # as mlx-lm's default: every linear
        if not wraps([name]) and not wraps(siblings) and not wraps(same):
            out[t] = cls.__name__
    return dict(sorted(out.items()))
