"""mlx-lm adapter directories with non-zero weights, built the way `mlx_lm.lora` builds and saves them.

`make_adapter(base, out)` loads the MLX model with mlx-lm, applies mlx-lm's own
`linear_to_lora_layers` (LoRA or DoRA; chosen keys and number of layers; MoE `switch_mlp`, embedding
and `lm_head` included when the keys say so) or unfreezes the last blocks (`full`), randomises the
trainable parameters (seeded), and saves them exactly as mlx-lm's trainer does
(`dict(tree_flatten(model.trainable_parameters()))`) with an `adapter_config.json` written by mlx-lm's
own `save_config` from `mlx_lm.lora`'s argument defaults. `mlx_logits` gives the reference output:
what `mlx_lm.load(base, adapter_path=dir)` computes on fixed token ids. `Zoo` memoises tiny bases and
adapters under one directory so that a test session builds each of them once.

Needs the `train` extra (mlx, mlx-lm); the HF side of `Zoo` also needs torch + transformers.

Example:
    >>> from mlx_bridge.testing import tiny_hf_model, mlx_convert
    >>> base = mlx_convert(tiny_hf_model("/tmp/hf", "llama"), "/tmp/mlx", dtype="float32")  # doctest: +SKIP
    >>> ad = make_adapter(base, "/tmp/ad", rank=4, keys=["self_attn.q_proj"])             # doctest: +SKIP
    >>> mlx_logits(base, probe_ids(101), adapter=ad).shape                                # doctest: +SKIP
    (2, 12, 101)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .models import mlx_convert, tiny_hf_model

# std of the adapter's contribution scale*(A@B) relative to nothing: the random base weights have std 0.08,
# so a delta of 0.04 changes the logits clearly while keeping the model numerically tame.
DELTA_STD = 0.04


def probe_ids(vocab_size: int, n: int = 2, length: int = 12, seed: int = 1234) -> np.ndarray:
    """Fixed token ids (n, length) int32 in [0, vocab_size), the same for a given seed.

    Example:
        >>> probe_ids(101).shape
        (2, 12)
    """
    return np.random.default_rng(seed).integers(0, vocab_size, size=(n, length), dtype=np.int64).astype(np.int32)


def lora_args(base: str | os.PathLike, out: str | os.PathLike, fine_tune_type: str, num_layers: int,
              lora_parameters: dict | None, seed: int = 0) -> dict:
    """`vars(args)` as `mlx_lm.lora.main` builds it (parser defaults, then CONFIG_DEFAULTS for the unset ones),
    with the given settings: what `save_config` turns into `adapter_config.json`.

    Example:
        >>> lora_args("base", "ad", "lora", 16, {"rank": 8, "scale": 20.0, "dropout": 0.0})["model"]  # doctest: +SKIP
        'base'
    """
    from mlx_lm import lora

    args = vars(lora.build_parser().parse_args([]))
    for k, v in lora.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args.update(model=str(base), train=True, fine_tune_type=fine_tune_type, num_layers=num_layers,
                lora_parameters=lora_parameters, adapter_path=str(out), seed=seed, data="tiny-test-data")
    return args


def _randomise(model, rank: int | None, seed: int) -> None:
    """Give every trainable parameter seeded non-zero values (lora_a, lora_b, m; full tensors for `full`)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    scales = {}  # module path -> LoRA scale
    for name, mod in model.named_modules():
        if hasattr(mod, "scale") and ("lora_a" in mod or "lora_b" in mod):
            scales[name] = float(mod.scale)
    new = {}
    for name, p in params.items():
        mod, leaf = name.rsplit(".", 1)
        shape, dt = tuple(p.shape), p.dtype
        if leaf == "lora_a":
            fan_in = shape[0] if len(shape) == 2 else shape[-1]  # (in, r) | (E, r, in); embedding: (vocab, r)
            bound = 1.0 / np.sqrt(fan_in)
            new[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        elif leaf == "lora_b":
            a = new.get(f"{mod}.lora_a")
            if a is None:
                a = np.array(params[f"{mod}.lora_a"], dtype=np.float32)
            std_ab = np.sqrt(rank) * float(a.std())  # std of (A@B) per unit std of B
            new[name] = (rng.standard_normal(shape) * DELTA_STD / (scales[mod] * std_ab)).astype(np.float32)
        elif leaf == "m":  # DoRA magnitude: start at mlx-lm's row norms, then move away from them
            new[name] = (np.array(p, dtype=np.float32) * rng.uniform(0.7, 1.3, size=shape)).astype(np.float32)
        else:  # full fine-tune: the block's own tensors
            if not mx.issubdtype(dt, mx.floating):
                raise ValueError(f"{name}: full fine-tune needs a float base, got {dt}")
            base = np.array(p.astype(mx.float32))
            new[name] = base + rng.standard_normal(shape).astype(np.float32) * 0.02
    model.load_weights([(k, mx.array(v).astype(params[k].dtype)) for k, v in new.items()], strict=False)
    mx.eval(model.parameters())


def make_adapter(base: str | os.PathLike, out: str | os.PathLike, *, fine_tune_type: str = "lora", rank: int = 4,
                 scale: float = 20.0, dropout: float = 0.0, num_layers: int = 2, keys: Sequence[str] | None = None,
                 seed: int = 0, model_field: str | None = None) -> Path:
    """Write an mlx-lm adapter dir (`adapters.safetensors` + `adapter_config.json`) for the MLX model `base`.

    Args:
        base: MLX model directory (plain or quantized).
        out: directory to write.
        fine_tune_type: "lora", "dora" or "full".
        rank, scale, dropout: `lora_parameters` as mlx-lm's YAML config takes them.
        num_layers: the last N blocks get adapters (mlx-lm's `--num-layers`; -1 = all).
        keys: `lora_parameters.keys` (block-relative paths like "self_attn.q_proj", or top-level paths like
            "lm_head", "model.embed_tokens"); None = mlx-lm's default (every linear/switch/embedding in a block).
        seed: seeds the adapter values.
        model_field: what the config's `model` says (default: `base` as given).

    Returns:
        `out`.

    Example:
        >>> make_adapter("mlx-llama", "ad-dora", fine_tune_type="dora", keys=["self_attn.v_proj"])  # doctest: +SKIP
        PosixPath('ad-dora')
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config

    base, out = Path(base), Path(out)
    if fine_tune_type not in ("lora", "dora", "full"):
        raise ValueError(f"fine_tune_type must be lora, dora or full, got {fine_tune_type!r}")
    model, _ = load_model(base)
    mx.random.seed(seed)
    model.freeze()
    if num_layers > len(model.layers):
        raise ValueError(f"num_layers {num_layers} > the model's {len(model.layers)} layers")
    lora_parameters = None
    if fine_tune_type == "full":
        for layer in model.layers[-max(num_layers, 0):]:
            layer.unfreeze()
    else:
        lora_parameters = {"rank": rank, "dropout": dropout, "scale": scale}
        if keys is not None:
            lora_parameters["keys"] = list(keys)
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    _randomise(model, rank, seed)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    if not weights:
        raise ValueError(f"{base}: keys {keys!r} matched no module: the adapter would be empty")
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    args = lora_args(Path(model_field) if model_field else base, out, fine_tune_type, num_layers, lora_parameters, seed)
    save_config(args, out / "adapter_config.json")
    return out


def make_checkpoint(adapter: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike,
                    ids: np.ndarray | None = None) -> Path:
    """Turn an adapter dir into a checkpoint dir of this project: the adapter files plus `manifest.json`
    (kind "checkpoint", `base_model.path` = `base`, `adapter` section) and `probes.safetensors` (MLX logits).

    Example:
        >>> make_checkpoint("ad", "ckpt", base="mlx-llama")  # doctest: +SKIP
        PosixPath('ckpt')
    """
    import shutil

    from ..manifest import Manifest, environment
    from ..probes import Probes

    adapter, out, base = Path(adapter), Path(out), Path(base)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy2(adapter / f, out / f)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    bcfg = json.loads((base / "config.json").read_text())
    lp = acfg.get("lora_parameters") or {}
    if ids is None:
        ids = probe_ids(bcfg["vocab_size"])
    logits = mlx_logits(base, ids, adapter=adapter)
    Probes(ids, logits, np.zeros((ids.shape[0], 0), np.int32)).save(out)
    Manifest(
        kind="checkpoint",
        base_model={"path": str(base), "hub_id": None, "config": bcfg, "quantization": bcfg.get("quantization")},
        architecture={"model_type": bcfg["model_type"], "layout": "mlx-lm", "num_layers": _num_layers(base, bcfg)},
        adapter={"type": acfg["fine_tune_type"], "rank": lp.get("rank"), "scale": lp.get("scale"),
                 "lora_alpha": lp["scale"] * lp["rank"] if lp else None, "alpha_given_as": "scale",
                 "dropout": lp.get("dropout"), "targets": lp.get("keys"), "num_layers": acfg["num_layers"]},
        environment=environment(),
        probes={"file": "probes.safetensors", "num": int(ids.shape[0]), "length": int(ids.shape[1]), "max_new_tokens": 0},
    ).save(out)
    return out


def _tag(key: str, value) -> str:
    """A config override in a cache directory's name; a long value (a rope dict) by its hash."""
    v = str(value)
    return f"{key}{v}" if len(v) <= 40 else f"{key}-{hashlib.sha256(v.encode()).hexdigest()[:12]}"


def _tags(overrides: dict) -> str:
    """Config overrides in a cache directory's name; many of them by their hash (a name is at most 255 bytes)."""
    tag = "-".join(_tag(k, v) for k, v in sorted(overrides.items()))
    return tag if len(tag) <= 120 else hashlib.sha256(tag.encode()).hexdigest()[:16]


def _num_layers(base: Path, cfg: dict) -> int:
    """The block count under whatever name the type's config uses (gpt2's `n_layer`, nemotron_h's
    `layers_block_type`), as transformers' config class resolves it."""
    if "num_hidden_layers" in cfg:
        return cfg["num_hidden_layers"]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(base)).num_hidden_layers


def mlx_logits(base: str | os.PathLike, ids: np.ndarray, adapter: str | os.PathLike | None = None) -> np.ndarray:
    """Logits (N, L, V) float32 of `mlx_lm.load(base, adapter_path=adapter)` on token ids (N, L).

    Example:
        >>> mlx_logits("mlx-llama", probe_ids(101)).dtype  # doctest: +SKIP
        dtype('float32')
    """
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=None if adapter is None else str(adapter))
    out = model(mx.array(ids)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def mlx_fuse(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
             dequantize: bool = True) -> Path:
    """Run mlx-lm's own `python -m mlx_lm fuse` (the reference fused weights); return `out`."""
    cmd = [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base), "--adapter-path", str(adapter),
           "--save-path", str(out)] + (["--dequantize"] if dequantize else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return Path(out)


class Zoo:
    """Tiny models and adapters built on demand, once each, under `root` (share one per test session).

    Example:
        >>> zoo = Zoo("/tmp/zoo")                                           # doctest: +SKIP
        >>> base = zoo.mlx("llama", quant=dict(bits=4, group_size=64))     # 4-bit llama, built once
        >>> ad = zoo.adapter(base, "lora-qv", keys=["self_attn.q_proj", "self_attn.v_proj"])
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def hf(self, arch: str, dtype: str = "float32", mxfp4: bool = False, **overrides) -> Path:
        """Random transformers model dir of `arch` (see `tiny_hf_model`)."""
        tag = "-".join([arch, dtype] + ["mxfp4"] * mxfp4 + ([_tags(overrides)] if overrides else []))
        d = self.root / f"hf-{tag}"
        if not (d / "config.json").exists():
            tiny_hf_model(d, arch, dtype=dtype, mxfp4=mxfp4, **overrides)
        return d

    def hub(self, arch: str, **overrides) -> Path:
        """`hf(arch)` laid out as the type's hub checkpoints are, which is what mlx-lm converts (gpt_oss: MXFP4)."""
        from ..archs.registry import describe

        return self.hf(arch, mxfp4=describe(arch).quirks.hub_mxfp4, **overrides)

    def mlx(self, arch: str, dtype: str = "float32", quant: dict | None = None, name: str | None = None,
            quant_predicate=None, **overrides) -> Path:
        """MLX model dir from `mlx_convert` of `hf(arch, **overrides)`; `quant` = {bits, group_size, mode}.

        `name` must be given with `quant_predicate` (a callable is not a cache key).
        """
        if quant_predicate is not None and name is None:
            raise ValueError("give a name for a model converted with a quant_predicate")
        q = quant or {}
        qtag = "-".join(f"{k}{v}" for k, v in sorted(q.items()))
        otag = _tags(overrides)
        d = self.root / "-".join(x for x in ("mlx", arch, dtype, qtag, otag, name) if x)
        if not (d / "config.json").exists():
            mlx_convert(self.hub(arch, **overrides), d, quantize=bool(q), bits=q.get("bits", 4),
                        group_size=q.get("group_size", 64), mode=q.get("mode", "affine"), dtype=dtype,
                        quant_predicate=quant_predicate)
        return d

    def adapter(self, base: Path, name: str, **kw) -> Path:
        """`make_adapter(base, ...)` under `<base>-<name>`."""
        d = Path(f"{base}-ad-{name}")
        spec = json.dumps(kw, sort_keys=True, default=str)
        made = Path(f"{d}.spec.json")
        if made.exists():
            if made.read_text() != spec:
                raise ValueError(f"adapter {name!r} of {base.name} was built with {made.read_text()}, now asked for {spec}")
            return d
        make_adapter(base, d, **kw)
        made.write_text(spec)
        return d

    def logits(self, base: Path, adapter: Path | None = None, ids: np.ndarray | None = None) -> np.ndarray:
        """MLX reference logits on `probe_ids` (cached as .npy beside the adapter or base)."""
        if ids is not None:  # custom ids: no cache
            return mlx_logits(base, ids, adapter)
        cache = Path(f"{adapter if adapter is not None else base}.logits.npy")
        if not cache.exists():
            ids = probe_ids(json.loads((Path(base) / "config.json").read_text())["vocab_size"])
            np.save(cache, mlx_logits(base, ids, adapter))
        return np.load(cache)


_ZOOS: dict[Path, Zoo] = {}


def shared_zoo(root: str | os.PathLike) -> Zoo:
    """One `Zoo` per root in this process, so that several test modules share what was built."""
    root = Path(root)
    if root not in _ZOOS:
        _ZOOS[root] = Zoo(root)
    return _ZOOS[root]
