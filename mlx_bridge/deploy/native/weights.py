"""Find an export's safetensors shards and load them into a module built on the meta device.

Weights are read with `safetensors.safe_open` (memory-mapped, straight onto the target device), never
with pickle. Every key is checked against the module before anything is assigned: missing,
unexpected, wrongly shaped and MLX-quantized tensors are all listed in one error.

Example:
    >>> files = weight_files("deploy/alpaca")                 # doctest: +SKIP
    >>> load_weights(module, files, "cpu", torch.bfloat16)    # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import BridgeError, raise_all
from ...fsutil import inside, read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# keys some checkpoints carry that are not parameters (old transformers saved rope buffers)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The shard files of an export: from `model.safetensors.index.json`, else `model.safetensors`."""
    d = Path(path)
    if (d / INDEX).exists():
        wm = read_json(d / INDEX).get("weight_map")
        if not isinstance(wm, dict):
            raise BridgeError(f"{d / INDEX}: not a valid index (no weight_map object)")
        files = sorted({inside(d, f, str(d / INDEX)) for f in wm.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise BridgeError(f"{d / INDEX}: names shards that do not exist: {', '.join(missing)}")
        return files
    if (d / SINGLE).exists():
        return [d / SINGLE]
    pickled = [p for p in PICKLES if (d / p).exists()]
    if pickled:
        raise BridgeError(f"{d}: weights are in {pickled[0]} (pickle), which is never loaded; "
                          "save them as safetensors")
    raise BridgeError(f"{d}: not an export: no {SINGLE} or {INDEX}")


def header_dtype(files: list[Path]) -> str | None:
    """The dtype most floating tensors are stored in ("float32", "bfloat16", "float16"), from headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                dt = fh.get_slice(k).get_dtype()
                name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt)
                if name:
                    counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else None


def load_weights(module: torch.nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype,
                 drop: tuple[str, ...] = (), fp32: tuple[str, ...] = ()) -> None:
    """Assign every tensor of `files` to `module` (built on meta), cast to `dtype`, on `device`.

    `drop` names keys the file may hold that the module deliberately lacks (a tied `lm_head.weight`);
    keys ending in one of `fp32` are kept in float32 whatever `dtype` is (as transformers'
    `_keep_in_fp32_modules_strict`: glm4_moe's router).
    """
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems, state, seen = [], {}, set()
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for k in fh.keys():
                if k in drop or k.endswith(IGNORED_SUFFIXES):
                    continue
                if k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] + ".weight" in expected:
                    problems.append(f"{f.name}: {k}: MLX-quantized weights; export them with `mlx-bridge export` "
                                    "(dequantizes to Hugging Face layout)")
                    continue
                if k not in expected:
                    problems.append(f"{f.name}: unexpected tensor {k}")
                    continue
                seen.add(k)
                shape = tuple(fh.get_slice(k).get_shape())
                if shape != expected[k]:
                    problems.append(f"{f.name}: {k} has shape {list(shape)}, the config implies {list(expected[k])}")
                    continue
                t = fh.get_tensor(k)
                state[k] = t.to(torch.float32 if k.endswith(fp32) else dtype) if t.is_floating_point() else t
    missing = sorted(set(expected) - seen)
    problems += [f"missing tensor {k}" for k in missing[:20]] + ([f"... {len(missing) - 20} more missing"]
                                                                  if len(missing) > 20 else [])
    raise_all(problems, "weights")
    module.load_state_dict(state, strict=True, assign=True)
