"""Plan an export: every output tensor, its shape and dtype, and what it is made of.

The plan is built and validated completely before anything is written; `--dry-run` prints it. Each
`Item` is made by `materialize` (or copied byte for byte when nothing changes), see `execute.py`.

Key pass: each MLX tensor is found in the registry's derived rules (`Arch.by_mlx`), which name the HF
tensors it is part of; each HF tensor becomes an `Item` of `Part`s (parts.py) that undo mlx-lm's
sanitize: unstack an expert, chunk, transpose, unshift, concatenate / interleave, merge axes. Tensors
mlx-lm drops are copied from `--hf-base`, or, in a base mlx-vlm converted, from the base itself under the
names and layouts derived from mlx-vlm (archs/mlx_vlm.json).
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field

from ..errors import raise_all
from ..archs import Arch, get_arch, template as key_template
from ..archs.registry import vlm_rules
from ..formats import BY_NAME, DTYPES
from ..formats.dtypes import count_nonfinite
from .parts import Item, Lora, Part, Quant, Ref
from .quant import AFFINE_BITS, GROUP_SIZES, MODES, MX_MODES, dequantized_shape
from .source import Source
from .validate import check_against_weights, check_types


@dataclass
class Plan:
    source: Source
    arch: Arch
    items: list[Item]
    dtype: str  # the model's dtype as config.json states it (torch name)
    adapter_modules: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def table(self) -> str:
        rows = [f"{i.name}  {list(i.shape)}  {DTYPES[i.dtype].name}  <- {i.describe()}" for i in self.items]
        n_copy = sum(i.is_copy for i in self.items)
        rows.append(f"# {len(self.items)} tensors, {self.total_bytes / 1e9:.3f} GB, {n_copy} copied byte for byte, "
                    f"{len(self.items) - n_copy} computed; dtype {self.dtype}; arch {self.arch.model_type}")
        return "\n".join(rows)


def _fill(template: str, layers: list[int], expert: int | None = None) -> str:
    out = template.replace("{e}", str(expert)) if expert is not None else template
    for i in layers:
        out = out.replace("{}", str(i), 1)
    return out


def _expert_part(template: str, nums: list[int]) -> tuple[int, list[int]]:
    """(expert index, layer numbers) of an MLX key whose template has "{e}" (e.g. dbrx's experts.{e}.w1)."""
    at = re.findall(r"\{e?\}", template).index("{e}")
    return nums[at], nums[:at] + nums[at + 1:]


def _quant_params(qcfg: dict, module: str) -> dict | None:
    over = qcfg.get(module)
    if over is False:
        return None
    p = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4), "mode": qcfg.get("mode", "affine")}
    if isinstance(over, dict):
        p.update({k: over[k] for k in ("group_size", "bits", "mode") if k in over})
    return p


def _natural(key: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in key.replace(".", " . ").split()]


def build_plan(source: Source, dtype: str = "auto", text_only: bool = False) -> Plan:
    """Validate SRC against its arch and adapter and list every output tensor (`text_only`: without the
    tensors mlx-lm drops, e.g. a vision tower, which the MLX model never computes with).

    Raises one `BridgeError` listing every problem found (unknown keys, shapes that don't fit, config
    contradicting the weights, unsupported quantization, ...).
    """
    base, adapter = source.base, source.adapter
    cfg = base.config
    where = str(base.path / "config.json")
    raise_all(check_types(cfg), where)  # before any value is used (for a size, or as a registry key)
    arch = get_arch(cfg, where)
    problems: list[str] = []
    # every source tensor (full fine-tune tensors replace the base's)
    refs: dict[str, Ref] = {k: Ref(f, k) for k, f in base.where.items()}
    lora_keys: dict[str, dict[str, Ref]] = {}
    if adapter is not None:
        afile = adapter.file
        ft = adapter.fine_tune_type
        for k in afile.keys():
            bad = count_nonfinite(afile.read(k))  # a private copy: nothing stays mapped (resident)
            if bad:
                problems.append(f"{afile.path.name}: {k}: {bad} NaN/Inf values")
            module, _, leaf = k.rpartition(".")
            if leaf in ("lora_a", "lora_b", "m") and ft in ("lora", "dora"):
                lora_keys.setdefault(module, {})[leaf] = Ref(afile, k)
            elif ft == "full":
                if k not in refs:
                    problems.append(f"{afile.path.name}: {k!r} is not a tensor of the base model {base.path}")
                elif base.where[k].info(k).shape != afile.info(k).shape:
                    problems.append(f"{afile.path.name}: {k!r} has shape {list(afile.info(k).shape)}, "
                                    f"base has {list(base.where[k].info(k).shape)}")
                else:
                    refs[k] = Ref(afile, k)
            else:
                problems.append(f"{afile.path.name}: unexpected key {k!r} for fine_tune_type {ft!r}")
    qcfg = base.quantization or {}
    quantized = {k[: -len(".scales")] for k in refs if k.endswith(".scales")}
    # mx-mode weights carry no dtype: they dequantize to the model's (its unquantized float weights')
    dense_dt = next((dt for k in sorted(refs) if k.endswith(".weight") and k[:-7] not in quantized
                     and DTYPES[dt := refs[k].file.info(k).dtype].floating), None)
    out_np = None if dtype == "auto" else BY_NAME[dtype]
    num_experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k)), None)
    logical: dict[str, tuple[int, ...]] = {}  # module -> dense weight shape (for adapter checks)
    model_float = None  # dtype of the model's dense weights
    outputs: dict[str, tuple[str, dict[int, Part]]] = {}  # HF name -> (HF template, part number -> Part)
    readers: dict[str, list[Part]] = {}  # MLX weight key -> the parts that read it
    dense_shape: dict[str, tuple[int, ...]] = {}  # MLX key -> its (dequantized) shape
    vlm = (vlm_rules(arch.model_type).get("rules") or {}) if arch.dropped else {}
    vlm_keys: list[str] = []  # the base's tensors in mlx-vlm's names (a base mlx_vlm.convert wrote)
    unknown: list[str] = []
    for key in sorted(refs, key=_natural):
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in ("scales", "biases"):
            continue
        ref = refs[key]
        info = ref.file.info(key)
        shape, src_dt, quant = info.shape, info.dtype, None
        if module in quantized and leaf == "weight":
            p = _quant_params(qcfg, module)
            if p is None:
                problems.append(f"{where}: quantization says {module!r} is not quantized, but {module}.scales exists")
                continue
            bits, gs, mode = p["bits"], p["group_size"], p["mode"]
            if mode not in MODES or (mode == "affine" and bits not in AFFINE_BITS) or gs not in GROUP_SIZES:
                problems.append(f"{where}: {module}: quantization mode={mode} bits={bits} group_size={gs} is not supported")
                continue
            if mode in MX_MODES and (bits, gs) != MX_MODES[mode]:
                problems.append(f"{where}: {module}: {mode} needs bits={MX_MODES[mode][0]} group_size={MX_MODES[mode][1]}")
                continue
            sref = refs[module + ".scales"]
            bref = refs.get(module + ".biases")
            if mode == "affine" and bref is None:
                problems.append(f"{ref.file.path.name}: {module}.biases missing for affine quantization")
                continue
            if mode == "nvfp4" and module + ".global_scale" in refs:
                problems.append(f"{ref.file.path.name}: {module}.global_scale (nvfp4 with a global scale) is not supported")
                continue
            shape = dequantized_shape(shape, bits)
            sshape = sref.file.info(sref.key).shape
            if shape[-1] % gs or tuple(sshape) != (*shape[:-1], shape[-1] // gs):
                problems.append(f"{sref.file.path.name}: {module}.scales has shape {list(sshape)}, but {bits}-bit "
                                f"group {gs} quantization of {module}.weight needs {[*shape[:-1], shape[-1] // gs]} "
                                f"(config.json quantization contradicts the weights)")
                continue
            quant = Quant(sref, bref, bits, gs, mode)
            sdt = sref.file.info(sref.key).dtype
            src_dt = sdt if mode == "affine" else dense_dt or st_of(cfg)
        template, layers = key_template(key)
        dense_shape[key] = tuple(shape)
        if leaf == "weight" and len(shape) >= 2:
            logical[module] = shape
            if DTYPES[src_dt].floating and model_float is None:
                model_float = src_dt
        uses = arch.by_mlx.get(template)
        if not uses and template in vlm:  # a tensor mlx-lm drops, kept by mlx-vlm under its own name
            vlm_keys.append(key)
            continue
        if not uses:
            unknown.append(f"{ref.file.path.name}: unknown key {key!r} for model_type {arch.model_type!r}")
            continue
        if "conv" in module.rpartition(".")[2] and len(shape) == 3 and shape[-1] > shape[1] and any(
                arch.rules[h]["parts"][i].get("perm") for h, i in uses):  # mlx-lm's own test in its sanitize
            problems.append(f"{ref.file.path.name}: {key} {tuple(shape)} is a conv weight as transformers saves it: "
                            f"this base is an HF checkpoint, which mlx-lm converts (transposes, folds) as it loads; "
                            f"convert it with mlx_lm.convert and export against that")
            continue
        for hf_t, i in uses:
            rule = arch.rules[hf_t]["parts"][i]
            idx, nums = rule.get("index"), layers
            if arch.rules[hf_t].get("experts"):  # one MLX tensor per expert, joined: expert e is part e
                i, nums = _expert_part(template, layers)
            if idx == "{e}" and num_experts is not None and shape[0] != num_experts:
                problems.append(f"{ref.file.path.name}: {key} stacks {shape[0]} experts, config says {num_experts}")
                break
            for e in (range(shape[0]) if idx == "{e}" else [idx]):
                name = _fill(hf_t, nums, e if idx == "{e}" else None)
                if "{" in name:
                    problems.append(f"{ref.file.path.name}: {key}: cannot name its HF tensor {hf_t}")
                    continue
                pq = quant and (quant if e is None else Quant(
                    Ref(quant.scales.file, quant.scales.key, e),
                    quant.biases and Ref(quant.biases.file, quant.biases.key, e), quant.bits, quant.group_size, quant.mode))
                part = Part(Ref(ref.file, key, e), src_dt, pq, chunk=tuple(rule["chunk"]) if "chunk" in rule else None,
                            perm=tuple(rule["perm"]) if "perm" in rule else None, shift=rule.get("shift", 0.0),
                            reshape=tuple(rule["reshape"]) if "reshape" in rule else None)
                outputs.setdefault(name, (hf_t, {}))[1][i] = part
                readers.setdefault(key, []).append(part)
    why = vlm_rules(arch.model_type).get("refused") if unknown and arch.dropped else None
    if why:  # most likely a vision tower under mlx-vlm's names: one line, not one per tensor
        problems.append(f"{unknown[0]} and {len(unknown) - 1} more: a base mlx-vlm converted? Its layout of "
                        f"{arch.model_type} is not derived ({why}); convert with mlx_lm.convert and pass --hf-base")
    else:
        problems += unknown
    items: list[Item] = []
    for name in sorted(outputs, key=_natural):
        hf_t, parts = outputs[name]
        rule = arch.rules[hf_t]
        n = len(rule["parts"])
        if rule.get("experts"):
            n = num_experts or len(parts)
            if sorted(parts) != list(range(n)):
                problems.append(f"{source.base.path}: {name} joins experts {sorted(parts)}, config says {n}")
                continue
        elif len(parts) != n:
            missing = [_fill(rule["parts"][i]["mlx"], key_template(name)[1]) for i in range(n) if i not in parts]
            problems.append(f"{source.base.path}: {name} needs {', '.join(missing)}, which the model lacks")
            continue
        ps = [parts[i] for i in range(n)]
        shapes = [p.shape(dense_shape[p.src.key]) for p in ps]
        shape = list(shapes[0])
        if n > 1:
            shape[rule["axis"]] = sum(s[rule["axis"]] for s in shapes)
        if "merge" in rule:  # two axes to mlx-lm, one in the HF tensor
            a = rule["merge"]
            shape[a: a + 2] = [shape[a] * shape[a + 1]]
        dt = ps[0].src_dtype
        if out_np is not None and DTYPES[dt].floating:
            dt = out_np.st
        items.append(Item(name, dt, tuple(shape), ps, rule.get("join"), rule.get("axis", 0), rule.get("merge")))
    items += [] if text_only else (_from_vlm(source, arch, vlm, vlm_keys, out_np, problems) if vlm_keys
                                   else _dropped(source, arch, out_np, problems))
    problems += [f"{where}: {p}" for p in check_against_weights(cfg, {m + ".weight": s for m, s in logical.items()})]
    # attach adapters to every part that reads the adapted MLX weight
    for module, parts in sorted(lora_keys.items(), key=lambda kv: _natural(kv[0])):
        problems += _attach(module, parts, arch, logical, readers.get(module + ".weight", []),
                            adapter.scale if adapter else 20.0)
    raise_all(problems, str(source.path))
    if dtype == "auto":
        model_dtype = DTYPES[model_float].name if model_float else "float32"
    else:
        model_dtype = dtype
    return Plan(source, arch, items, model_dtype, sorted(lora_keys))


def st_of(cfg: dict) -> str:
    """Safetensors dtype for weights whose dtype the checkpoint doesn't carry (mx quantization modes)."""
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    d = BY_NAME.get(name)
    return d.st if d is not None and d.floating else "BF16"


def _dropped(source: Source, arch: Arch, out_np, problems: list[str]) -> list[Item]:
    """The HF tensors mlx-lm drops on loading (vision towers ...), copied from the HF base."""
    if not arch.dropped:
        return []
    hf = source.hf_base
    if hf is None:
        problems.append(f"{source.base.path}: mlx-lm drops {len(arch.dropped)} tensor kinds of {arch.model_type} "
                        f"({arch.dropped[0]} ...) that the export needs: pass --hf-base DIR, the Hugging Face "
                        f"checkpoint the base was converted from")
        return []
    if hf.config.get("model_type") != arch.model_type:
        problems.append(f"{hf.path / 'config.json'}: model_type {hf.config.get('model_type')!r}, the base is "
                        f"{arch.model_type!r}")
        return []
    items, dropped = [], set(arch.dropped)
    for key in sorted(hf.where, key=_natural):
        if key_template(key)[0] in dropped:
            info = hf.where[key].info(key)
            dt = out_np.st if out_np is not None and DTYPES[info.dtype].floating else info.dtype
            zero = key_template(key)[0] in arch.quirks.unused
            items.append(Item(key, dt, tuple(info.shape), [Part(Ref(hf.where[key], key), info.dtype, zero=zero)]))
    if not items:
        problems.append(f"{hf.path}: none of the tensors mlx-lm drops ({arch.dropped[0]} ...) is there")
    return items


def _from_vlm(source: Source, arch: Arch, vlm: dict, keys: list[str], out_np, problems: list[str]) -> list[Item]:
    """The tensors mlx-lm drops, from a base mlx-vlm converted: renamed and transposed back as the derived
    mlx-vlm rules say (archs/mlx_vlm.json), bytes otherwise untouched."""
    items, base = [], source.base
    for key in keys:
        t, layers = key_template(key)
        rule = vlm[t]
        info = base.where[key].info(key)
        dt = out_np.st if out_np is not None and DTYPES[info.dtype].floating else info.dtype
        part = Part(Ref(base.where[key], key), info.dtype, perm=tuple(rule["perm"]) if "perm" in rule else None,
                    zero=rule["hf"] in arch.quirks.unused)
        items.append(Item(_fill(rule["hf"], layers), dt, part.shape(tuple(info.shape)), [part]))
    missing = sorted(set(arch.dropped) - {vlm[key_template(k)[0]]["hf"] for k in keys})
    if missing:
        problems.append(f"{base.path}: an mlx-vlm conversion of {arch.model_type} without {missing[0]} "
                        f"({len(missing)} tensor kinds missing)")
    return items


def _attach(module: str, parts: dict[str, Ref], arch: Arch, logical: dict, readers: list[Part],
            scale: float) -> list[str]:
    """Attach one adapted MLX module's LoRA/DoRA to the output parts made from its weight."""
    a, b, m = parts.get("lora_a"), parts.get("lora_b"), parts.get("m")
    fname = (a or b or m).file.path.name
    if a is None or b is None:
        return [f"{fname}: {module}: needs both lora_a and lora_b"]
    if module not in logical:
        return [f"{fname}: {module}.lora_a: the base model has no module {module!r}"]
    W = logical[module]
    ash, bsh = a.file.info(a.key).shape, b.file.info(b.key).shape
    if not readers:
        return [f"{fname}: {module}: adapted module has no output weight"]
    if len(W) == 3:  # stacked experts (SwitchLinear)
        E, out, inp = W
        r = ash[1] if len(ash) == 3 else -1
        bad = _misfit(fname, module, W, ash, (E, r, inp), bsh, (E, out, r))
        if bad:
            return bad
        if m is not None:
            return [f"{fname}: {module}: DoRA on stacked experts is not supported (mlx-lm doesn't train it)"]
        for p in readers:
            e = p.src.index
            p.lora = (Lora("switch", Ref(a.file, a.key, e), Ref(b.file, b.key, e), scale) if e is not None
                      else Lora("stacked", a, b, scale))
        return []
    kind = "embedding" if key_template(module)[0] in arch.embeddings else "linear"
    if len(W) != 2:
        return [f"{fname}: {module}: adapter on a weight of shape {list(W)}"]
    if kind == "embedding":
        vocab, dim = W
        r = ash[1] if len(ash) == 2 else -1
        bad = _misfit(fname, module, W, ash, (vocab, r), bsh, (r, dim))
        if bad:
            return bad
        if m is not None:
            return [f"{fname}: {module}: DoRA on an embedding is not supported by the exporter"]
    else:
        out, inp = W
        r = ash[1] if len(ash) == 2 else -1
        bad = _misfit(fname, module, W, ash, (inp, r), bsh, (r, out))
        if bad:
            return bad
        if m is not None and tuple(m.file.info(m.key).shape) != (out,):
            return [f"{fname}: {module}.m has shape {list(m.file.info(m.key).shape)}, expected [{out}]"]
    for p in readers:
        p.lora = Lora(kind, a, b, scale, m)
    return []


def _misfit(fname: str, module: str, W, ash, want_a, bsh, want_b) -> list[str]:
    """Problems naming each adapter tensor whose shape does not fit the base weight."""
    out = []
    for leaf, got, want in (("lora_a", ash, want_a), ("lora_b", bsh, want_b)):
        if tuple(got) != tuple(want) or -1 in want:
            shown = [("r" if w == -1 else w) for w in want]
            out.append(f"{fname}: {module}.{leaf} has shape {list(got)}, expected {shown} to fit "
                       f"{module}.weight {list(W)}")
    return out
