"""Derive one model type's key rules from mlx-lm itself (used by scripts/derive_archs.py; needs torch,
transformers, mlx and mlx-lm — the translator never imports this module).

How: build a tiny transformers model of the type from `tiny.tiny_config`, save it as hub checkpoints
are laid out (`save_pretrained`), overwrite every saved tensor with distinct values (element k of the
whole checkpoint holds 8·(k+1), exact in float32), run mlx-lm's own loading path (`_get_classes`,
`ModelArgs.from_dict`, `Model.sanitize`), and find each MLX element's value again. Where it landed
gives, per Hugging Face tensor, the MLX tensors it is made of: renamed, one expert of a stacked
tensor, a chunk of a fused tensor, transposed / reshaped, concatenated or interleaved from several,
shifted by a constant (the +1 of zero-centred norms: the residue modulo 8), or dropped.

The rules are written as templates ("{}" a layer index, "{e}" an expert index) so they hold for any
size; every concrete key of a template must give the same rule, else the type is refused.

gpt_oss ships (and mlx-lm reads) its experts only as MXFP4 blocks, where a ramp value does not survive:
`mlx_loaded_mxfp4` sends each element's index through in base-8 digits instead, one pass a digit, and
reads them back after mlx-lm's own `load_model` and `mx.dequantize`. Beside the rules, the HF modules
PEFT refuses to target are recorded by asking PEFT (`peft_unwrappable`), and a multimodal wrapper's text
ModelArgs defaults (`mlx_text_defaults`).

Example:
    >>> derive("llama")["hf"]["model.layers.{}.self_attn.q_proj.weight"]  # doctest: +SKIP
    {'parts': [{'mlx': 'model.layers.{}.self_attn.q_proj.weight'}]}
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from .quirks import QUIRKS, Quirks
from .registry import template
from .hub import to_hub_transposed
from .tiny import hub_style, tiny_config

STEP = 8  # value spacing: residues 1..7 mod 8 show a constant shift
MAX_ELEMENTS = (1 << 24) // STEP - 1  # every value exact in float32


class Refused(Exception):
    """The type's rules cannot be derived (the message says why, in one line)."""


def mlx_lm_types() -> list[tuple[str, str]]:
    """(model_type, mlx-lm module) for every type mlx-lm loads: its model modules and MODEL_REMAPPING."""
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    root = Path(mlx_lm.models.__file__).parent
    mods = sorted(p.stem for p in root.glob("*.py")
                  if "class Model(" in (t := p.read_text()) and "class ModelArgs" in t)
    return sorted([(m, m) for m in mods] + [(a, t) for a, t in MODEL_REMAPPING.items() if t in mods])


def hf_classes(model_type: str) -> dict:
    """HF class names from transformers' own auto mappings."""
    from transformers.models.auto import configuration_auto as ca, modeling_auto as ma

    causal = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    itt = ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    # a type with both (qwen3_5, llama4) ships on the hub as the multimodal checkpoint
    return {"hf_class": itt or causal, "hf_auto": "image_text_to_text" if itt else "causal_lm" if causal else None,
            "config_class": ca.CONFIG_MAPPING_NAMES.get(model_type)}


def mlx_defaults(model_type: str, text: bool = False) -> dict:
    """mlx-lm's `ModelArgs` fields that have a default (JSON-able ones), read off the dataclass; `text`: those
    of the class it reads `text_config` with (multimodal wrappers; {} when there is none)."""
    from mlx_lm.utils import _get_classes

    from .tiny import mlx_text_args

    args_cls = mlx_text_args(model_type) if text else _get_classes({"model_type": model_type})[1]
    if args_cls is None:
        return {}
    out = {}
    for f in dataclasses.fields(args_cls):
        v = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if v is dataclasses.MISSING:
            continue
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[f.name] = v
    return out


def _has_text_config(model_type: str) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(model_type), "text_config", None) is not None


def hf_defaults(model_type: str, keys) -> dict:
    """transformers' config-class defaults for the fields mlx-lm also reads (JSON-able ones)."""
    from transformers import AutoConfig

    c = AutoConfig.for_model(model_type)
    c = getattr(c, "text_config", None) or c
    try:
        rope = dict(getattr(c, "rope_parameters", None) or {})
    except Exception:
        rope = {}
    out = {}
    for k in keys:
        try:
            v = getattr(c, k) if k not in rope else rope[k]  # v5 keeps rope fields in rope_parameters
            json.dumps(v)
        except Exception:  # absent, not JSON, or a per-layer attribute transformers refuses to read globally
            continue
        out[k] = v
    return out


def save_tiny(model_type: str, out: Path, **overrides) -> tuple[dict, object]:
    """Save a tiny random transformers model of `model_type` as the hub lays it out; return config.json and
    the model as saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cls = hf_classes(model_type)
    cfg = tiny_config(model_type, **overrides)
    cfg.setdefault("vocab_size", 96)
    default = AutoConfig.for_model(model_type)
    for k, v in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if hasattr(default, k):
            cfg.setdefault(k, v)
    config = AutoConfig.for_model(model_type, **cfg)
    auto = AutoModelForCausalLM if cls["hf_auto"] == "causal_lm" else AutoModelForImageTextToText
    torch.manual_seed(0)
    model = auto.from_config(config, dtype=torch.float32)
    q = QUIRKS.get(model_type, Quirks())
    saved = model.base_model if q.hub_saves_base_model else model
    saved.save_pretrained(str(out), save_original_format=not q.hub_saves_fused)
    to_hub_transposed(out, model_type)
    p = out / "config.json"
    c = hub_style(model_type, json.loads(p.read_text()), config)
    p.write_text(json.dumps(c, indent=2, sort_keys=True))
    return c, saved


def fill_ramps(out: Path) -> dict[str, tuple[int, tuple]]:
    """Overwrite every saved tensor with distinct values; return name -> (offset, shape)."""
    from safetensors.numpy import load_file, save_file

    layout, k = {}, 0
    for f in sorted(out.glob("model*.safetensors")):
        ts = load_file(str(f))
        for name in sorted(ts):
            n = ts[name].size
            layout[name] = (k, ts[name].shape)
            ts[name] = (STEP * (np.arange(k, k + n, dtype=np.float64) + 1)).astype(np.float32).reshape(ts[name].shape)
            k += n
        save_file(ts, str(f), metadata={"format": "pt"})
    if k > MAX_ELEMENTS:
        raise Refused(f"tiny checkpoint has {k} elements, more than {MAX_ELEMENTS} can be traced exactly")
    return layout


def mlx_sanitized(out: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """mlx-lm's own loading up to `sanitize`: the MLX layout (what `mlx_lm.convert` saves)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, load_config

    config = load_config(out)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = {}
    for f in sorted(out.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    want = dict(tree_flatten(model.parameters()))
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise Refused(f"mlx-lm's sanitize does not give the model's parameters (missing {missing[:3]}, "
                      f"unexpected {extra[:3]})")
    bad = [f"{k} {tuple(weights[k].shape)} for {tuple(v.shape)}" for k, v in want.items() if weights[k].shape != v.shape]
    if bad:
        raise Refused(f"mlx-lm's sanitize gives parameters of the wrong shape ({'; '.join(bad[:2])})")
    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}, _kinds(model)


def _kinds(model) -> dict:
    """MLX module templates that are embeddings, and linears mlx-lm's LoRA wraps (quantized ones too)."""
    import mlx.nn as nn

    linear = (nn.Linear, nn.QuantizedLinear)
    return {"embeddings": sorted({template(n)[0] for n, m in model.named_modules() if isinstance(m, nn.Embedding)}),
            "linears": sorted({template(n)[0] for n, m in model.named_modules()
                               if isinstance(m, linear) or type(m).__name__ in ("SwitchLinear", "QuantizedSwitchLinear")})}


def trace(layout: dict, mlx: dict[str, np.ndarray]) -> dict:
    """Per HF tensor: its parts (MLX tensor, expert index, chunk, permutation, shift), or dropped."""
    total = max(o + int(np.prod(s)) for o, s in layout.values())
    owner = np.full(total, -1, np.int64)
    pos = np.zeros(total, np.int64)
    shift = np.zeros(total, np.float64)
    names = sorted(mlx)
    for i, name in enumerate(names):
        v = mlx[name].astype(np.float64).ravel()
        q = np.round(v / STEP)
        r = v - STEP * q
        k = q.astype(np.int64) - 1
        if np.any(np.abs(r) > STEP / 2 - 1) or np.any(r != np.round(r)) or k.min() < 0 or k.max() >= total:
            raise Refused(f"MLX tensor {name} holds values computed from the checkpoint (not moved, shifted or copied)")
        if np.any(owner[k] >= 0):
            raise Refused(f"MLX tensor {name} repeats elements another MLX tensor has")
        owner[k], pos[k], shift[k] = i, np.arange(k.size), r
    rules, dropped = {}, []
    for hf, (off, shape) in sorted(layout.items()):
        n = int(np.prod(shape))
        ids, ps, sh = (a[off:off + n].reshape(shape) for a in (owner, pos, shift))
        if np.all(ids < 0):
            dropped.append(hf)
            continue
        if np.any(ids < 0):
            raise Refused(f"HF tensor {hf} is partly dropped by mlx-lm")
        try:
            rules[hf] = _split(hf, ids, ps, sh, names, mlx)
        except Refused as e:
            rules[hf] = _unflattened(hf, ids, ps, sh, names, mlx) or _raise(e)
    return {"hf": rules, "dropped": dropped}


def _raise(e: Exception):
    raise e


def _unflattened(hf, ids, ps, sh, names, mlx) -> dict | None:
    """The rule with one HF axis seen as two (deepseek's kv_b_proj: (heads * (nope + v), r) is
    (heads, nope + v, r) to mlx-lm); the exporter joins the parts, then merges the two axes back."""
    for a in range(ids.ndim):
        n = ids.shape[a]
        for f in range(2, n):
            if n % f:
                continue
            shape = ids.shape[:a] + (f, n // f) + ids.shape[a + 1:]
            try:
                rule = _split(hf, *(x.reshape(shape) for x in (ids, ps, sh)), names, mlx)
            except Refused:
                continue
            return {**rule, "merge": a}
    return None


def _split(hf, ids, ps, sh, names, mlx) -> dict:
    distinct = np.unique(ids)
    if distinct.size == 1:
        return {"parts": [_piece(hf, ids, ps, sh, names, mlx)]}
    for ax in range(ids.ndim):
        ref = np.moveaxis(ids, ax, 0)
        if not np.all(ref == ref[(slice(None),) + (0,) * (ids.ndim - 1)].reshape((-1,) + (1,) * (ids.ndim - 1))):
            continue
        seq = ref[(slice(None),) + (0,) * (ids.ndim - 1)]
        p = distinct.size
        if all(seq[i] == seq[i % p] for i in range(seq.size)) and len(set(seq[:p])) == p and seq.size > p:
            sl = [np.take(a, np.arange(j, seq.size, p), axis=ax) for j in range(p) for a in (ids, ps, sh)]
            parts = [_piece(hf, *sl[3 * j: 3 * j + 3], names, mlx) for j in range(p)]
            return {"join": "interleave", "axis": ax, "parts": parts}
        bounds = [0] + [i for i in range(1, seq.size) if seq[i] != seq[i - 1]] + [seq.size]
        if len(bounds) - 1 == p:
            parts = []
            for a, b in zip(bounds, bounds[1:]):
                idx = np.arange(a, b)
                parts.append(_piece(hf, *(np.take(x, idx, axis=ax) for x in (ids, ps, sh)), names, mlx))
            return {"join": "concat", "axis": ax, "parts": parts}
    raise Refused(f"HF tensor {hf} is spread over MLX tensors in a way the rules cannot state")


def _piece(hf, ids, ps, sh, names, mlx) -> dict:
    """One part: HF block = reshape(transpose(M[index][chunk], perm)) + shift."""
    name = names[int(ids.flat[0])]
    ms = mlx[name].shape
    hs = ps.shape
    part: dict = {"mlx": name}
    if not ms or not hs:  # a scalar (apertus's xIELU parameters, (1,) in transformers, () in mlx-lm)
        if int(np.prod(ms)) != 1 or int(np.prod(hs)) != 1:
            raise Refused(f"HF tensor {hf}: {name} is a scalar on one side only")
        if ms != hs:
            part["reshape"] = list(hs)
        if sh.item():
            part["shift"] = float(sh.item())
        return part
    idx = np.unravel_index(ps, ms)
    perm, chunk = [], None
    for j, a in enumerate(idx):
        if np.all(a == a.flat[0]):
            if ms[j] > 1:
                if "index" in part or j != 0:
                    raise Refused(f"HF tensor {hf}: more than one fixed index into {name}")
                part["index"] = int(a.flat[0])
            continue
        axes = [i for i in range(len(hs)) if hs[i] > 1 and not np.all(np.diff(a, axis=i) == 0)]
        if len(axes) != 1:
            raise Refused(f"HF tensor {hf}: axis {j} of {name} mixes HF axes")
        i = axes[0]
        line = np.moveaxis(a, i, 0)[(slice(None),) + (0,) * (a.ndim - 1)]
        if not np.array_equal(line, line[0] + np.arange(hs[i])):
            raise Refused(f"HF tensor {hf}: axis {j} of {name} is not a contiguous range")
        if line[0] or hs[i] != ms[j]:
            if chunk is not None or ms[j] % hs[i] or line[0] % hs[i]:
                raise Refused(f"HF tensor {hf}: {name} axis {j} is split unevenly")
            chunk = [j, int(line[0] // hs[i]), ms[j] // hs[i]]
        perm.append((i, j))
    rest = [j for j in range(len(ms)) if not (j == 0 and "index" in part)]  # axes of M[index]
    to_h = dict((j, i) for i, j in perm)
    free = [i for i in range(len(hs)) if hs[i] == 1 and i not in to_h.values()]
    for j in rest:  # size-1 axes of M go to size-1 axes of HF, in order
        if j not in to_h:
            if not free:
                raise Refused(f"HF tensor {hf}: {name} has more axes than it")
            to_h[j] = free.pop(0)
    if free or len(rest) != len(hs):
        raise Refused(f"HF tensor {hf}: {name} has fewer axes than it")
    order = [rest.index(j) for j in sorted(rest, key=lambda j: to_h[j])]
    if order != list(range(len(rest))):
        part["perm"] = order
    if chunk is not None:
        part["chunk"] = [rest.index(chunk[0]), chunk[1], chunk[2]]  # axis of M[index]
    s = np.unique(sh)
    if s.size != 1:
        raise Refused(f"HF tensor {hf}: {name} is shifted by different amounts")
    if s[0]:
        part["shift"] = float(s[0])
    return part


def templated(hf: dict, dropped: list[str]) -> dict:
    """Concrete rules -> templates; every instance of a template must say the same."""
    from .derive_more import per_expert

    out: dict[str, dict] = {}
    rules = hf
    for hf, rule in rules.items():
        t, nums = template(hf)
        layers = [n for n, seg in zip(nums, re.findall(r"\{e?\}", t)) if seg == "{}"]
        expert = [n for n, seg in zip(nums, re.findall(r"\{e?\}", t)) if seg == "{e}"]
        r = per_expert(json.loads(json.dumps(rule)))
        for p in r["parts"]:
            mt, mnums = template(p["mlx"])
            if r.get("experts"):  # the expert index is the part's place, not a layer number
                mnums = [n for n, seg in zip(mnums, re.findall(r"\{e?\}", mt)) if seg == "{}"]
            elif "{e}" in mt:
                mnums = None
            if mnums is None or mnums != layers[: len(mnums)]:
                raise Refused(f"HF tensor {hf} comes from {p['mlx']}: layer numbers do not correspond")
            p["mlx"] = mt
            if "index" in p and expert and p["index"] == expert[0]:
                p["index"] = "{e}"
        if t in out and out[t] != r:
            raise Refused(f"HF tensors {t} follow different rules in different layers/experts")
        out[t] = r
    return {"hf": dict(sorted(out.items())), "dropped": sorted({template(d)[0] for d in dropped})}


def derive(model_type: str) -> dict:
    """The registry data of one model type (raises `Refused`)."""
    import mlx_lm

    try:
        return _derive(model_type, mlx_lm.__version__)
    except SystemExit:  # an mlx-lm module that exits on import (olmo without ai2-olmo)
        raise Refused(f"mlx-lm's {model_type} module cannot be imported here (it exits)") from None
    except Refused:
        raise
    except Exception as e:
        raise Refused(f"deriving failed ({type(e).__name__}: {_line(e)})") from None


def _line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:160]


def _derive(model_type: str, version: str) -> dict:
    data = {"model_type": model_type, **hf_classes(model_type)}
    if data["hf_class"] is None:
        raise Refused(f"transformers has no causal-LM or image-text-to-text class for {model_type!r}")
    data["mlx_defaults"] = mlx_defaults(model_type)
    if _has_text_config(model_type) and (text := mlx_defaults(model_type, text=True)):
        data["mlx_text_defaults"] = text
    data["hf_defaults"] = hf_defaults(model_type, data["mlx_defaults"])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        try:
            _, hf_model = save_tiny(model_type, d)
        except Refused:
            raise
        except Exception as e:
            raise Refused(f"transformers could not build a tiny {model_type} ({type(e).__name__}: "
                          f"{_line(e)})") from None
        import shutil

        shutil.copytree(d, d / "orig")  # random weights, for asking PEFT (peft_misloads)
        layout = fill_ramps(d)
        from .derive_more import mlx_loaded_mxfp4

        try:
            mlx, kinds = mlx_loaded_mxfp4(d, layout) if QUIRKS.get(model_type, Quirks()).hub_mxfp4 else mlx_sanitized(d)
            data.update(kinds)
        except Refused:
            raise
        except Exception as e:
            raise Refused(f"mlx-lm could not load a tiny {model_type} ({type(e).__name__}: "
                          f"{_line(e)})") from None
        data.update(templated(**trace(layout, mlx)))
        from .derive_more import optional_rules, peft_misloads, peft_names, peft_unwrappable

        data["hf"] = dict(sorted({**optional_rules(model_type), **data["hf"]}.items()))

        adaptable = set(data["linears"]) | set(data["embeddings"])  # HF modules an mlx-lm adapter can reach
        data["peft_refuses"] = peft_unwrappable(hf_model, {t.rsplit(".", 1)[0] for t, r in data["hf"].items()
                                                           if any(p["mlx"].rsplit(".", 1)[0] in adaptable
                                                                  for p in r["parts"])})
        plain = {t.rsplit(".", 1)[0] for t, r in data["hf"].items() if t.endswith(".weight") and len(r["parts"]) == 1
                 and not set(r["parts"][0]) - {"mlx", "index"} and "merge" not in r
                 and r["parts"][0]["mlx"].rsplit(".", 1)[0] in data["linears"]} - set(data["peft_refuses"])
        data["peft_names"] = peft_names(d / "orig", data["hf_auto"], plain)
        data["peft_misloads"] = peft_misloads(d / "orig", data["hf_auto"], plain, data["peft_names"])
    data["mlx_lm"] = version
    return data

