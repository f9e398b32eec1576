"""Plan an export: every output tensor, its shape and dtype, and what it is made of.

The plan is built and validated completely before anything is written; `--dry-run` prints it. Each
`Item` is made by `materialize` (or copied byte for byte when nothing changes), see `execute.py`.

Key pass first (the arch table renames), then tensor ops on the renamed item: `dequantize`,
`unstack_experts` (an expert slice of a stacked tensor), `fuse_lora` / `fuse_dora`, `cast`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BridgeError, raise_all
from ..formats import BY_NAME, DTYPES, SafetensorsFile
from ..formats.dtypes import count_nonfinite
from .archs import Arch, get_arch
from .lora import fuse_dora, fuse_lora
from .quant import AFFINE_BITS, GROUP_SIZES, MODES, MX_MODES, dequantize, dequantized_shape
from .source import Source
from .validate import check_against_weights, check_types

EMBEDDINGS = ("model.embed_tokens",)  # modules that are nn.Embedding (LoRAEmbedding layout)


@dataclass(frozen=True)
class Ref:
    """A source tensor, or its slice `[index]` along the first axis (one expert of a stacked tensor)."""

    file: SafetensorsFile
    key: str
    index: int | None = None

    def read(self) -> np.ndarray:
        return self.file.read(self.key, self.index)

    def __str__(self) -> str:
        return f"{self.file.path.name}:{self.key}" + (f"[{self.index}]" if self.index is not None else "")


@dataclass(frozen=True)
class Quant:
    scales: Ref
    biases: Ref | None
    bits: int
    group_size: int
    mode: str

    def __str__(self) -> str:
        return f"dequantize({self.mode} {self.bits}-bit g{self.group_size})"


@dataclass(frozen=True)
class Lora:
    kind: str  # "linear" | "embedding" | "switch"
    a: Ref
    b: Ref
    scale: float
    m: Ref | None = None  # DoRA magnitude

    def __str__(self) -> str:
        return f"{'dora' if self.m is not None else 'lora'}({self.kind}, scale={self.scale:g}, {self.a.key[:-7]})"


@dataclass
class Item:
    name: str  # output (HF) key
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    src: Ref
    src_dtype: str
    quant: Quant | None = None
    lora: Lora | None = None

    @property
    def is_copy(self) -> bool:
        return self.quant is None and self.lora is None and self.dtype == self.src_dtype

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> str:
        ops = [str(self.src)]
        if self.src.index is not None:
            ops.append(f"unstack_experts[{self.src.index}]")
        if self.quant:
            ops.append(str(self.quant))
        if self.lora:
            ops.append(str(self.lora))
        if self.dtype != self.src_dtype or self.quant:
            ops.append(f"cast({DTYPES[self.dtype].name})")
        return ("copy " if self.is_copy else "") + " -> ".join(ops)


def materialize(item: Item) -> np.ndarray:
    """Compute one output tensor (dequantize -> fuse adapter in float32 -> round once)."""
    w = item.src.read()
    if item.quant:
        q = item.quant
        w = dequantize(w, q.scales.read(), q.biases.read() if q.biases else None, bits=q.bits,
                       group_size=q.group_size, mode=q.mode, out_dtype=np.float32 if item.lora else DTYPES[item.dtype].np)
    if item.lora:
        lo = item.lora
        if lo.m is not None:
            w = fuse_dora(w, lo.a.read(), lo.b.read(), lo.scale, lo.m.read())
        else:
            w = fuse_lora(w, lo.a.read(), lo.b.read(), lo.scale, lo.kind, out_dtype=DTYPES[item.dtype].np)
    w = w.astype(DTYPES[item.dtype].np, copy=False)
    check_finite(item, w)
    return w


def check_finite(item: Item, w: np.ndarray) -> None:
    """Refuse an output tensor `w` with NaN/Inf values (a damaged source, or a fused adapter that
    overflows the output dtype)."""
    n = count_nonfinite(w)
    if n:
        why = "" if item.is_copy else f" after {' -> '.join(item.describe().split(' -> ')[1:])}"
        raise BridgeError(f"{item.src}: {n} of {w.size} values of {item.name} are NaN or Inf{why}")


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


def _quant_params(qcfg: dict, module: str) -> dict | None:
    over = qcfg.get(module)
    if over is False:
        return None
    p = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4), "mode": qcfg.get("mode", "affine")}
    if isinstance(over, dict):
        p.update({k: over[k] for k in ("group_size", "bits", "mode") if k in over})
    return p


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in key.replace(".", " . ").split()]


def build_plan(source: Source, dtype: str = "auto") -> Plan:
    """Validate SRC against its arch and adapter and list every output tensor.

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
            bad = count_nonfinite(afile.get(k))
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
    out_np = None if dtype == "auto" else BY_NAME[dtype]
    items: list[Item] = []
    hf_params = arch.hf_params()
    num_experts = cfg.get(arch.num_experts_key) or cfg.get("num_local_experts") or cfg.get("num_experts")
    logical: dict[str, tuple[int, ...]] = {}  # module -> dense weight shape (for adapter checks)
    model_float = None  # dtype of the model's dense weights
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
            src_dt = sdt if mode == "affine" else st_of(cfg)
        template, layers = arch.template(key)
        if leaf == "weight" and len(shape) >= 2:
            logical[module] = shape
            if DTYPES[src_dt].floating and model_float is None:
                model_float = src_dt
        mtemplate = template[: -len(leaf) - 1]
        if mtemplate in arch.experts:
            E = shape[0]
            if num_experts is not None and E != num_experts:
                problems.append(f"{ref.file.path.name}: {key} stacks {E} experts, config says {arch.num_experts_key}={num_experts}")
                continue
            for e in range(E):
                name = _fill(arch.experts[mtemplate] + "." + leaf, layers, e)
                eref = Ref(ref.file, key, e)
                equant = quant and Quant(Ref(quant.scales.file, quant.scales.key, e),
                                         quant.biases and Ref(quant.biases.file, quant.biases.key, e), quant.bits,
                                         quant.group_size, quant.mode)
                items.append(_item(name, shape[1:], eref, src_dt, equant, out_np))
            continue
        if template not in hf_params:
            problems.append(f"{ref.file.path.name}: unknown key {key!r} for model_type {arch.model_type!r}")
            continue
        items.append(_item(key, shape, ref, src_dt, quant, out_np))
    problems += [f"{where}: {p}" for p in check_against_weights(cfg, {m + ".weight": s for m, s in logical.items()})]
    # attach adapters
    by_name = {i.name: i for i in items}
    for module, parts in sorted(lora_keys.items(), key=lambda kv: _natural(kv[0])):
        problems += _attach(module, parts, arch, logical, by_name, adapter.scale if adapter else 20.0)
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


def _item(name, shape, ref, src_dt, quant, out_np) -> Item:
    dt = src_dt
    if out_np is not None and DTYPES[src_dt].floating:
        dt = out_np.st
    return Item(name, dt, tuple(shape), ref, src_dt, quant)


def _attach(module: str, parts: dict[str, Ref], arch: Arch, logical: dict, by_name: dict[str, Item],
            scale: float) -> list[str]:
    """Attach one adapted module's LoRA/DoRA to the output items it produces."""
    a, b, m = parts.get("lora_a"), parts.get("lora_b"), parts.get("m")
    fname = (a or b or m).file.path.name
    if a is None or b is None:
        return [f"{fname}: {module}: needs both lora_a and lora_b"]
    if module not in logical:
        return [f"{fname}: {module}.lora_a: the base model has no module {module!r}"]
    W = logical[module]
    ash, bsh = a.file.info(a.key).shape, b.file.info(b.key).shape
    template, layers = arch.template(module + ".weight")
    mtemplate = template[: -len(".weight")]
    if mtemplate in arch.experts:
        E, out, inp = W
        r = ash[1] if len(ash) == 3 else -1
        bad = _misfit(fname, module, W, ash, (E, r, inp), bsh, (E, out, r))
        if bad:
            return bad
        if m is not None:
            return [f"{fname}: {module}: DoRA on stacked experts is not supported (mlx-lm doesn't train it)"]
        for e in range(E):
            name = _fill(arch.experts[mtemplate] + ".weight", layers, e)
            it = by_name[name]
            it.lora = Lora("switch", Ref(a.file, a.key, e), Ref(b.file, b.key, e), scale)
        return []
    kind = "embedding" if module in EMBEDDINGS else "linear"
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
    it = by_name.get(module + ".weight")
    if it is None:
        return [f"{fname}: {module}: adapted module has no output weight"]
    it.lora = Lora(kind, a, b, scale, m)
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
