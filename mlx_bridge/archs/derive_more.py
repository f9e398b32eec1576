"""What `derive.py` needs beyond a ramp trace: gpt_oss's MXFP4 experts traced digit by digit through mlx-lm's own
loading, per-expert tensors joined into one HF tensor (dbrx, `per_expert`), and what PEFT refuses to target or does
not load as written, asked of PEFT.

Example:
    >>> peft_unwrappable(gpt_oss_tiny_model)  # doctest: +SKIP
    {'model.layers.{}.mlp.experts': 'GptOssExperts', 'model.layers.{}.mlp.router': 'GptOssTopKRouter'}
"""

from __future__ import annotations

import json
import re
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


def per_expert(rule: dict) -> dict:
    """Parts that are experts 0, 1, ... of one MLX template (dbrx: mlx-lm splits `experts.mlp.w1`, the experts
    concatenated on axis 0, into one tensor per expert) -> one part and `"experts": "concat"`: the HF tensor is
    every expert's tensor, in expert order, joined on `axis`."""
    parts = rule["parts"]
    if rule.get("join") != "concat" or len(parts) < 2:
        return rule
    temps = [template(p["mlx"]) for p in parts]
    if len({t for t, _ in temps}) != 1 or "{e}" not in temps[0][0]:
        return rule
    at = re.findall(r"\{e?\}", temps[0][0]).index("{e}")
    if [nums[at] for _, nums in temps] != list(range(len(parts))):
        return rule
    if any({k: v for k, v in p.items() if k != "mlx"} != {k: v for k, v in parts[0].items() if k != "mlx"}
           for p in parts):
        return rule
    return {"join": "concat", "axis": rule["axis"], "experts": "concat", "parts": [parts[0]]}


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


def peft_misloads(hf_dir: Path, auto: str, templates: set[str], names: dict[str, str] | None = None) -> dict[str, str]:
    """Those of the HF module `templates` (2-D weights an mlx-lm adapter can change, PEFT wraps their class) whose
    adapter, written as `--format peft` writes it (`translate.peft.target_spec`, keys per module of the hub layout),
    PEFT's own loading does not apply as their weights say: transformers' MoE layers fuse experts that PEFT converts
    by leaf name for some types only (and renames dense `gate_proj`s with them). Asked of PEFT on the tiny checkpoint
    `hf_dir` (random weights): `PeftModel.from_pretrained`'s logits against the checkpoint with W + B @ A written in.
    Checked for every template at once, then per group of siblings (one parent module), then alone; a template is
    recorded when its group fails and it fails alone too, or when it passes only with its siblings (-> "with
    siblings"). Returns template -> why."""
    import shutil
    import warnings

    import torch
    from safetensors.numpy import load_file, save_file

    from ..translate.peft import built_name, target_spec

    files = {f.name: load_file(str(f)) for f in sorted(hf_dir.glob("model*.safetensors"))}
    where = {k: n for n, ts in files.items() for k, v in ts.items() if v.ndim == 2 and k.endswith(".weight")}
    concrete = {t: sorted(k[: -len(".weight")] for k in where if template(k)[0] == t + ".weight") for t in templates}
    concrete = {t: ms for t, ms in concrete.items() if ms}
    if not concrete:
        return {}
    cfg = json.loads((hf_dir / "config.json").read_text())
    vocab = (cfg.get("text_config") or cfg).get("vocab_size") or cfg.get("vocab_size")
    ids = torch.tensor(np.random.default_rng(0).integers(0, vocab, (1, 12)))

    def logits(model):
        with torch.no_grad():
            try:
                return model(ids, use_cache=False).logits.float()
            except AttributeError:  # a wrapper whose forward needs pixels (llama4): its own causal LM
                return model.language_model(ids, use_cache=False).logits.float()

    def load(d):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForCausalLM if auto == "causal_lm" else AutoModelForImageTextToText
        return cls.from_pretrained(str(d), dtype=torch.float32).eval()

    def applies(ts: list[str]) -> bool:
        mods = sorted(m for t in ts for m in concrete[t])
        rng = np.random.default_rng(1)
        with tempfile.TemporaryDirectory() as tmp:
            ref, ad = Path(tmp) / "ref", Path(tmp) / "ad"
            shutil.copytree(hf_dir, ref)
            ad.mkdir()
            new = {n: dict(ts_) for n, ts_ in files.items()}
            lora = {}
            for m in mods:
                w = new[where[m + ".weight"]][m + ".weight"]
                a = rng.normal(0, 0.5, (2, w.shape[1])).astype(np.float32)
                b = rng.normal(0, 0.5, (w.shape[0], 2)).astype(np.float32)
                new[where[m + ".weight"]][m + ".weight"] = (w.astype(np.float32) + b @ a).astype(w.dtype)
                n = built_name(names or {}, m)
                lora[f"base_model.model.{n}.lora_A.weight"], lora[f"base_model.model.{n}.lora_B.weight"] = a, b
            for n, ts_ in new.items():
                save_file(ts_, str(ref / n), metadata={"format": "pt"})
            save_file(lora, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
            spec = target_spec([built_name(names or {}, m) for m in mods],
                               sorted(built_name(names or {}, k[: -len(".weight")]) for k in where))
            (ad / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2, "lora_dropout": 0.0,
                "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, **spec}))
            try:
                from peft import PeftModel

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    got = logits(PeftModel.from_pretrained(load(hf_dir), str(ad)).eval())
                if any("missing adapter keys" in str(x.message) for x in caught):
                    return False
                want = logits(load(ref))
            except Exception:
                return False
            return bool(torch.allclose(got, want, rtol=0, atol=1e-4 * float(want.abs().max())))

    if applies(sorted(concrete)):
        return {}
    out = {}
    groups: dict[str, list[str]] = {}
    for t in concrete:
        groups.setdefault(t.rpartition(".")[0], []).append(t)
    for ts in groups.values():
        if applies(ts):
            if len(ts) > 1:
                out.update({t: "with siblings " + ", ".join(sorted(set(ts) - {t})) for t in ts if not applies([t])})
            continue
        alone = [t for t in ts if not applies([t])] if len(ts) > 1 else ts
        out.update({t: "PEFT's loading does not apply it" for t in alone})
        if not alone:  # each applies alone, not together
            out.update({t: "PEFT's loading does not apply it beside " + ", ".join(sorted(set(ts) - {t})) for t in ts})
    if not out:  # every group applies alone, the union does not: each group is named
        out = {t: "PEFT's loading does not apply it beside the other modules' adapters" for t in concrete}
    return dict(sorted(out.items()))


def peft_names(hf_dir: Path, auto: str, templates: set[str]) -> dict[str, str]:
    """HF module template -> the module's name in the model transformers builds from the checkpoint, where they differ
    (multimodal checkpoints of the v4 layout: language_model.model.layers.{} is model.language_model.layers.{}); PEFT
    matches adapters against the built model. Found by value: the checkpoint tensor `M.weight` is the built model's
    parameter with the same values (random weights, each unique)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForCausalLM if auto == "causal_lm" else AutoModelForImageTextToText
    built = {k: v for k, v in cls.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict().items() if v.ndim == 2}
    by_shape: dict[tuple, list[str]] = {}
    for k, v in built.items():
        by_shape.setdefault(tuple(v.shape), []).append(k)
    out: dict[str, str] = {}
    for f in sorted(hf_dir.glob("model*.safetensors")):
        for k, v in load_file(str(f)).items():
            t = template(k)[0].removesuffix(".weight")
            if not k.endswith(".weight") or t not in templates or v.ndim != 2:
                continue
            same = [b for b in by_shape.get(v.shape, []) if np.array_equal(built[b].numpy(), v)]
            if len(same) != 1 or same[0] == k:
                continue
            rt = template(same[0])[0].removesuffix(".weight")
            if out.setdefault(t, rt) != rt:
                raise Refused(f"HF module {t} is built under more than one name ({out[t]}, {rt})")
    return dict(sorted(out.items()))


# config switches that add tensors (biases) when on; off in the tiny configs the main trace uses
OPTIONAL_FLAGS = ("attention_bias", "mlp_bias")


def optional_rules(model_type: str) -> dict:
    """The rules of the tensors an optional switch adds (llama's attention_bias / mlp_bias: q/k/v/o and MLP
    biases), traced on a second tiny model with every such switch on that transformers' config has off by default
    and mlx-lm's ModelArgs also reads. {} where mlx-lm cannot load that model (the biases stay unknown keys, which
    the export refuses by name)."""
    import dataclasses

    from mlx_lm.utils import _get_classes
    from transformers import AutoConfig

    from .derive import fill_ramps, mlx_sanitized, save_tiny, templated, trace

    default = AutoConfig.for_model(model_type)
    if getattr(default, "text_config", None) is not None:  # a wrapper: its language model's switches are nested
        return {}
    mlx_fields = {f.name for f in dataclasses.fields(_get_classes({"model_type": model_type})[1])}
    flags = {f: True for f in OPTIONAL_FLAGS if getattr(default, f, None) is False and f in mlx_fields}
    if not flags:
        return {}
    with tempfile.TemporaryDirectory() as d:
        try:
            save_tiny(model_type, Path(d), **flags)
            layout = fill_ramps(Path(d))
            return templated(**trace(layout, mlx_sanitized(Path(d))[0]))["hf"]
        except Exception:  # noqa: BLE001 - the switch is not honoured by one side: nothing more to derive
            return {}
