"""Export mlx-lm LoRA/DoRA adapters as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    MLX (mlx-lm)                     PEFT
    X.lora_a (in, r)                 base_model.model.X.lora_A.weight (r, in)     = lora_a^T
    X.lora_b (r, out)                base_model.model.X.lora_B.weight (out, r)    = lora_b^T
    X.m (out,)   (DoRA)              base_model.model.X.lora_magnitude_vector     = m
    embed lora_a (vocab, r)          ...lora_embedding_A (r, vocab)               = lora_a^T
    embed lora_b (r, dim)            ...lora_embedding_B (dim, r)                 = lora_b^T
    switch lora_a[e] (r, in)         <per-expert HF module e>.lora_A.weight       = lora_a[e]
    switch lora_b[e] (out, r)        <per-expert HF module e>.lora_B.weight       = lora_b[e]
    scale                            lora_alpha = scale * r  (use_rslora false)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BridgeError
from ..formats import BY_NAME, DTYPES, StreamWriter, TensorSpec
from .plan import Plan, Ref, _natural

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
VLLM_DEFAULT_MAX_RANK = 16


@dataclass
class PeftTensor:
    name: str
    ref: Ref
    transpose: bool
    dtype: str
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        a = self.ref.read()
        a = a.T if self.transpose else a
        return np.ascontiguousarray(a.astype(DTYPES[self.dtype].np, copy=False))


def peft_tensors(plan: Plan, dtype: str = "auto") -> tuple[list[PeftTensor], list[str], int]:
    """(tensors, adapted HF module paths, rank) of the PEFT adapter for a planned LoRA/DoRA export."""
    out: list[PeftTensor] = []
    modules: list[str] = []
    ranks = set()
    bad = sorted({f"{p.src.key} -> {it.name}" for it in plan.items if not it.plain or it.parts[0].lora
                  and it.parts[0].lora.kind == "stacked" for p in it.parts if p.lora is not None}, key=_natural)
    if bad:
        raise BridgeError(f"{plan.source.path}: PEFT cannot express an adapter on a weight mlx-lm reshapes, splits "
                          f"or shifts ({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); use --format hf")
    unwrappable = plan.arch.peft_refuses
    bad = sorted({f"{m} ({unwrappable[t]})" for it in plan.items if it.lora is not None
                  for m in [it.name.rsplit(".", 1)[0]] if (t := plan.arch.template(m)[0]) in unwrappable}, key=_natural)
    if bad:
        raise BridgeError(f"{plan.source.path}: PEFT's LoRA refuses to target the transformers module of an adapted weight "
                          f"({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); use --format hf")
    _misloads(plan)
    for it in plan.items:
        lo = it.lora
        if lo is None:
            continue
        module = built_name(plan.arch.peft_names, it.name[: -len(".weight")])
        modules.append(module)
        pre = f"base_model.model.{module}."

        def add(suffix, ref, transpose):
            info = ref.file.info(ref.key)
            shape = info.shape if ref.index is None else info.shape[1:]
            shape = tuple(reversed(shape)) if transpose else tuple(shape)
            dt = info.dtype if dtype == "auto" else BY_NAME[dtype].st
            out.append(PeftTensor(pre + suffix, ref, transpose, dt, shape))
            return shape

        if lo.kind == "embedding":
            ranks.add(add("lora_embedding_A", lo.a, True)[0])
            add("lora_embedding_B", lo.b, True)
        elif lo.kind == "switch":
            ranks.add(add("lora_A.weight", lo.a, False)[0])
            add("lora_B.weight", lo.b, False)
        else:
            ranks.add(add("lora_A.weight", lo.a, True)[0])
            add("lora_B.weight", lo.b, True)
            if lo.m is not None:
                add("lora_magnitude_vector", lo.m, False)
    if not out:
        raise BridgeError(f"{plan.source.path}: no LoRA/DoRA tensors to export as PEFT")
    if len(ranks) != 1:
        raise BridgeError(f"{plan.source.path}: adapters have different ranks {sorted(ranks)}; PEFT export needs one")
    out.sort(key=lambda t: _natural(t.name))
    return out, modules, ranks.pop()


def _misloads(plan: Plan) -> None:
    """Refuse adapters PEFT's own loading would not apply as written (`Arch.peft_misloads`: e.g. transformers' fused
    MoE experts PEFT converts for some types only, dense gate_proj renamed with them), or only beside their siblings."""
    mis = plan.arch.peft_misloads
    adapted = {it.name[: -len(".weight")] for it in plan.items if it.lora is not None}
    bad = []
    for m in sorted(adapted, key=_natural):
        t, nums = plan.arch.template(m)
        why = mis.get(t)
        if why is None:
            continue
        if why.startswith("with siblings "):
            need = [_fill_module(s, nums) for s in why.removeprefix("with siblings ").split(", ")]
            if all(n in adapted for n in need):
                continue
        bad.append(f"{m} ({why})")
    if bad:
        raise BridgeError(f"{plan.source.path}: PEFT's loading does not apply these adapters as written "
                          f"({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); use --format hf")


def built_name(names: dict[str, str], module: str) -> str:
    """The module's name in the model transformers builds (`Arch.peft_names`; PEFT matches adapters against it).

    Example:
        >>> built_name({"language_model.model.layers.{}.mlp.up_proj": "model.language_model.layers.{}.mlp.up_proj"},
        ...            "language_model.model.layers.3.mlp.up_proj")
        'model.language_model.layers.3.mlp.up_proj'
    """
    from ..archs import template

    t, nums = template(module)
    return _fill_module(names[t], nums) if t in names else module


def _fill_module(template: str, nums: list[int]) -> str:
    for n in nums:
        template = template.replace("{e}" if "{}" not in template else "{}", str(n), 1)
    return template


def target_spec(adapted: list[str], all_modules: list[str]) -> dict:
    """PEFT targeting that selects exactly the adapted modules.

    Compact form (leaf names + layers_to_transform) when it matches exactly those modules among all the
    model's modules; otherwise the full module paths (PEFT matches a target equal to the module name).
    """
    leaves = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    layers = sorted({int(m.split(".")[2]) for m in adapted if m.startswith("model.layers.")})
    all_layers = sorted({int(m.split(".")[2]) for m in all_modules if m.startswith("model.layers.")})

    def selected(m: str) -> bool:
        if m.rsplit(".", 1)[-1] not in leaves:
            return False
        if layers != all_layers:
            return m.startswith("model.layers.") and int(m.split(".")[2]) in layers
        return True

    if all(m.startswith("model.layers.") for m in adapted) and {m for m in all_modules if selected(m)} == set(adapted):
        spec = {"target_modules": leaves, "layers_to_transform": None, "layers_pattern": None}
        if layers != all_layers:
            spec.update(layers_to_transform=layers, layers_pattern="layers")
        return spec
    return {"target_modules": sorted(adapted, key=_natural), "layers_to_transform": None, "layers_pattern": None}


def peft_config(plan: Plan, modules: list[str], rank: int, base_ref: str) -> dict:
    adapter = plan.source.adapter
    scale = adapter.scale
    all_modules = [built_name(plan.arch.peft_names, i.name[: -len(".weight")]) for i in plan.items
                   if i.name.endswith(".weight") and len(i.shape) == 2]
    use_dora = any(i.lora is not None and i.lora.m is not None for i in plan.items)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref, "revision": None,
        "r": rank, "lora_alpha": scale * rank, "lora_dropout": float(adapter.lora.get("dropout", 0.0)),
        "use_rslora": False, "use_dora": use_dora, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    cfg.update(target_spec(modules, all_modules))
    return cfg


def vllm_warnings(cfg: dict, tensors: list[PeftTensor]) -> list[str]:
    w = []
    if cfg["use_dora"]:
        w.append("vLLM does not serve DoRA adapters; use --format hf (fused) to serve this with vLLM")
    if cfg["r"] > VLLM_DEFAULT_MAX_RANK:
        from .compat import lora_rank_flag  # torch-free

        try:
            flag = f"start vLLM with --max-lora-rank {lora_rank_flag(cfg['r'])} (or use --format hf)"
        except BridgeError:
            flag = "vLLM cannot serve this rank; use --format hf"
        w.append(f"rank {cfg['r']} is above vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_RANK}; {flag}")
    if cfg.get("modules_to_save"):
        w.append("vLLM refuses modules_to_save; use --format hf")
    if any(".experts." in t.name for t in tensors):
        w.append("LoRA on MoE experts: many vLLM versions cannot apply it to fused MoE layers; use --format hf to be safe")
    if any("lora_embedding" in t.name for t in tensors):
        w.append("embedding LoRA: vLLM's support depends on the model; use --format hf to be safe")
    return w


def write_peft(out: Path, plan: Plan, tensors: list[PeftTensor], cfg: dict) -> None:
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
    with StreamWriter(out / WEIGHTS, specs, {"format": "pt"}) as w:
        for t in tensors:
            w.write(t.name, t.read())
    write_config(out, cfg)


def write_config(out: Path, cfg: dict) -> None:
    (out / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
