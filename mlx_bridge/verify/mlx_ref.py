"""Fresh reference outputs from MLX (mlx-lm) for `verify --against`: logits and greedy continuations.

`against` is a checkpoint directory (manifest.json of kind "checkpoint", or a bare mlx-lm adapter
directory: adapters.safetensors + adapter_config.json naming the base `model`) or an MLX model
directory (config.json + weights). Needs mlx and mlx-lm (`pip install mlx-bridge[train]`).

Example:
    >>> probes = mlx_probes("ckpt/", np.array([[1, 52, 60, 7]], np.int32), max_new_tokens=8)  # doctest: +SKIP
    >>> probes.logits.shape                                                                   # doctest: +SKIP
    (1, 4, 32000)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import BridgeError
from ..probes import Probes


def mlx_source(against: str | os.PathLike) -> tuple[str, str | None]:
    """(model path or hub id for `mlx_lm.load`, adapter path or None) for a checkpoint or MLX dir."""
    d = Path(against)
    if not d.is_dir():
        raise BridgeError(f"{d}: --against must be a checkpoint or MLX model directory")
    if (d / "manifest.json").exists():
        from ..manifest import Manifest

        m = Manifest.load(d)
        if m.kind == "checkpoint":
            base = m.base_model.get("path") or m.base_model.get("hub_id")
            if not base:
                raise BridgeError(f"{d / 'manifest.json'}: base_model has no path or hub_id")
            return str(base), str(d)
    if (d / "adapters.safetensors").exists():
        try:
            base = json.loads((d / "adapter_config.json").read_text()).get("model")
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise BridgeError(f"{d / 'adapter_config.json'}: unreadable ({e})") from e
        if not base:
            raise BridgeError(f"{d / 'adapter_config.json'}: no 'model' naming the base model")
        return str(base), str(d)
    if (d / "config.json").exists():
        return str(d), None
    raise BridgeError(f"{d}: neither a checkpoint (manifest.json, adapters.safetensors) nor an MLX model (config.json)")


def mlx_probes(against: str | os.PathLike, input_ids: np.ndarray, max_new_tokens: int) -> Probes:
    """Run `input_ids` (N, L) through the MLX model: logits (N, L, V) float32 and greedy (N, G) tokens
    drawn without stopping at EOS, as the trainer's probes are made."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm import load as mlx_load
        from mlx_lm.generate import generate_step
    except ImportError as e:
        raise BridgeError(f"--against needs mlx and mlx-lm ({e}); install mlx-bridge[train]") from e
    base, adapter = mlx_source(against)
    if Path(base).is_dir():  # config values checked before mlx-lm builds anything from them
        from ..fsutil import read_json
        from ..translate.validate import validate_model_dir

        validate_model_dir(read_json(Path(base) / "config.json"), sorted(Path(base).glob("model*.safetensors")),
                           str(Path(base) / "config.json"))
    model, _ = mlx_load(base, adapter_path=adapter, tokenizer_config={"trust_remote_code": False},
                        trust_remote_code=False)
    logits = np.array(model(mx.array(input_ids.astype(np.int32))).astype(mx.float32))
    greedy = np.zeros((input_ids.shape[0], max_new_tokens), np.int32)
    for i, row in enumerate(input_ids):
        steps = generate_step(mx.array(row.astype(np.int32)), model, max_tokens=max_new_tokens)
        greedy[i] = [t for t, _ in steps]
    floats = [str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())]
    floats = [f for f in floats if f in ("float32", "float16", "bfloat16")]
    dtype = max(set(floats), key=floats.count) if floats else "float32"
    from ..train.backend import probe_dtype  # float32 on CUDA computes in TF32

    return Probes(input_ids.astype(np.int32), logits, greedy, dtype=probe_dtype(dtype))
