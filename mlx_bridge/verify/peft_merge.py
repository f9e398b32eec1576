"""A PEFT adapter merged into its base as a Hugging Face directory, so `verify` can check it.

The merge reads only what PEFT reads -- `adapter_config.json` (r, lora_alpha, use_rslora, use_dora)
and `adapter_model.safetensors` -- and applies PEFT's own formulas to the base's Hugging Face weights
(the MLX base dequantized and renamed by the exporter's plan):

    linear     W + s * B @ A                     s = lora_alpha / r  (lora_alpha / sqrt(r) with rslora)
    embedding  E + s * (B @ A)^T                 lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
    DoRA       m / ||W + s * B @ A||_row * (W + s * B @ A)

so a wrong transpose, scale or module name in the PEFT export shows up as a parity failure against the
MLX probes, exactly as for a fused export. Numpy only; the merged model is written once, in the base's
dtypes (each merged weight computed in float32 and rounded once).

Example:
    >>> merged_dir("deploy/alpaca-peft", "/tmp/merged")    # doctest: +SKIP
    PosixPath('/tmp/merged')
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BridgeError, raise_all
from ..formats import DTYPES, StreamWriter, TensorSpec, load_file
from ..fsutil import read_json
from ..manifest import FILENAME as MANIFEST, Manifest
from ..probes import FILENAME as PROBES

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LEAVES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "eA", "lora_embedding_B": "eB",
          "lora_magnitude_vector": "m"}


def is_peft_dir(d: str | os.PathLike) -> bool:
    """A PEFT adapter directory (adapter_config.json with a peft_type, adapter_model.safetensors)."""
    d = Path(d)
    return (d / WEIGHTS).exists() and (d / CONFIG).exists()


def scaling(cfg: dict, where: str) -> float:
    """PEFT's scale of B @ A from adapter_config.json (checked: a LORA config with usable numbers).

    Example:
        >>> scaling({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "adapter_config.json")
        2.0
    """
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r}: only LORA adapters can be verified")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r: {r!r}, expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha: {alpha!r}, expected a finite number")
    for k in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(k):
            problems.append(f"{k} is set: not supported by this check")
    raise_all(problems, where)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _merge(w: np.ndarray, parts: dict[str, np.ndarray], s: float) -> np.ndarray:
    w32 = w.astype(np.float32)
    if "eA" in parts:  # embedding: (vocab, dim) += s * (B @ A)^T
        return w32 + s * (parts["eB"].astype(np.float32) @ parts["eA"].astype(np.float32)).T
    adapted = w32 + s * (parts["B"].astype(np.float32) @ parts["A"].astype(np.float32))
    if "m" in parts:
        adapted = (parts["m"].astype(np.float32) / np.linalg.norm(adapted, axis=1))[:, None] * adapted
    return adapted


def merged_dir(peft_dir: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Write the base (MLX dir) with the PEFT adapter of `peft_dir` merged in as a HF directory `out`.

    Args:
        peft_dir: a PEFT export (adapter_config.json, adapter_model.safetensors; probes.safetensors).
        out: a new or empty directory.
        base: the MLX base model directory; default: the one the export's manifest names.
    Raises:
        BridgeError: not a LORA adapter, no base, adapter tensors that fit no base weight.
    """
    from ..translate import hf_config
    from ..translate.parts import materialize
    from ..translate.plan import build_plan
    from ..translate.source import Model, Source

    peft_dir, out = Path(peft_dir), Path(out)
    cfg = read_json(peft_dir / CONFIG)
    s = scaling(cfg, str(peft_dir / CONFIG))
    if base is None:
        m = Manifest.load(peft_dir) if (peft_dir / MANIFEST).exists() else None
        base = (m.export.get("base") if m else None) or cfg.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise BridgeError(f"{peft_dir}: base model {base!r} is not a directory; pass --base MLX_BASE_DIR")
    source = Source(Path(base), Model.open(base), None, None)
    try:
        plan = build_plan(source, "auto")
        hcfg, _ = hf_config.effective_config(source.base.config, plan.arch, plan.dtype)
        lora: dict[str, dict[str, np.ndarray]] = {}
        problems = []
        for k, v in load_file(peft_dir / WEIGHTS).items():
            leaf = next((l for l in LEAVES if k.endswith("." + l)), None)
            if not k.startswith(PREFIX) or leaf is None:
                problems.append(f"{WEIGHTS}: {k}: not a LoRA tensor PEFT names")
                continue
            lora.setdefault(k[len(PREFIX): -len(leaf) - 1], {})[LEAVES[leaf]] = v
        items = {i.name: i for i in plan.items}
        problems += [f"{WEIGHTS}: {m}: no weight {m}.weight in the base" for m in lora if m + ".weight" not in items]
        raise_all(problems, str(peft_dir))
        out.mkdir(parents=True, exist_ok=True)
        specs = [TensorSpec(it.name, it.dtype, it.shape) for it in plan.items]
        with StreamWriter(out / "model.safetensors", specs, {"format": "pt"}) as w:
            for it in plan.items:
                parts = lora.get(it.name[: -len(".weight")]) if it.name.endswith(".weight") else None
                t = materialize(it)
                if parts is not None:
                    t = _merge(t, parts, s).astype(DTYPES[it.dtype].np)
                    if t.shape != it.shape:
                        raise BridgeError(f"{peft_dir / WEIGHTS}: {it.name}: merged shape {list(t.shape)} "
                                          f"!= {list(it.shape)}")
                w.write(it.name, t)
        hf_config.write_config(out, hcfg)
        hf_config.write_generation_config(source.base.path, out, hcfg)
        hf_config.copy_tokenizer(source.base.path, out)
        hf_config.copy_tokenizer(peft_dir, out)
        if (peft_dir / PROBES).is_file():
            shutil.copyfile(peft_dir / PROBES, out / PROBES)
    finally:
        source.close()
    return out
