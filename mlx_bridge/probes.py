"""Golden outputs saved with a checkpoint: `probes.safetensors` (numpy only; no mlx, no torch).

The trainer runs a few fixed token sequences through the MLX model at save time and stores what MLX
computed, so that any later conversion can be checked on a machine without MLX (`mlx-bridge verify`).

Tensors:
    input_ids  int32   (N, L)     probe token ids (no padding; all probes have length L)
    logits     float32 (N, L, V)  MLX logits for every position of every probe
    greedy     int32   (N, G)     MLX greedy continuation of each probe (G new tokens, no EOS stop)
    long_input_ids  int32   (1, L2)    optional: one probe longer than the sliding window and past the
                                       rope-scaling threshold (what short probes cannot see)
    long_logits     float32 (1, K, V)  MLX logits of its last K positions
Metadata (str -> str): "prompts" (JSON list of the probe texts, may be empty), "max_new_tokens" (G),
"dtype" (the dtype MLX computed in), "source" ("mlx").

Example:
    >>> import numpy as np, tempfile, os
    >>> p = Probes(np.zeros((1, 3), np.int32), np.zeros((1, 3, 5), np.float32), np.zeros((1, 2), np.int32))
    >>> d = tempfile.mkdtemp(); _ = p.save(d)
    >>> Probes.load(d).greedy.shape
    (1, 2)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BridgeError
from .formats import SafetensorsFile, save_file

FILENAME = "probes.safetensors"


@dataclass
class Probes:
    input_ids: np.ndarray  # (N, L) int32
    logits: np.ndarray  # (N, L, V) float32
    greedy: np.ndarray  # (N, G) int32
    prompts: list[str] = field(default_factory=list)
    dtype: str = "float32"
    long_input_ids: np.ndarray | None = None  # (1, L2) int32
    long_logits: np.ndarray | None = None  # (1, K, V) float32: the last K positions

    def save(self, directory: str | os.PathLike) -> Path:
        p = Path(directory) / FILENAME
        meta = {"prompts": json.dumps(self.prompts), "max_new_tokens": str(self.greedy.shape[1]),
                "dtype": self.dtype, "source": "mlx"}
        tensors = {"input_ids": self.input_ids.astype(np.int32), "logits": self.logits.astype(np.float32),
                   "greedy": self.greedy.astype(np.int32)}
        if self.long_input_ids is not None:
            tensors.update(long_input_ids=self.long_input_ids.astype(np.int32),
                           long_logits=self.long_logits.astype(np.float32))
        save_file(tensors, p, meta)
        return p

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Probes":
        p = Path(directory)
        p = p / FILENAME if p.is_dir() else p
        if not p.exists():
            raise BridgeError(f"{p}: no probes (the checkpoint was saved without golden MLX outputs)")
        with SafetensorsFile(p) as f:
            missing = {"input_ids", "logits", "greedy"} - set(f.keys())
            if missing:
                raise BridgeError(f"{p}: missing tensors {sorted(missing)}")
            arrays = {k: np.array(f.get(k)) for k in ("input_ids", "logits", "greedy")}
            if "long_input_ids" in f.keys() and "long_logits" in f.keys():
                arrays.update({k: np.array(f.get(k)) for k in ("long_input_ids", "long_logits")})
            meta = f.metadata
        n, L = arrays["input_ids"].shape
        if arrays["logits"].shape[:2] != (n, L) or arrays["greedy"].shape[0] != n:
            raise BridgeError(f"{p}: shapes do not agree: input_ids {arrays['input_ids'].shape}, "
                              f"logits {arrays['logits'].shape}, greedy {arrays['greedy'].shape}")
        if "long_logits" in arrays:
            li, ll = arrays["long_input_ids"], arrays["long_logits"]
            if li.ndim != 2 or ll.ndim != 3 or ll.shape[0] != li.shape[0] or ll.shape[1] > li.shape[1]:
                raise BridgeError(f"{p}: long probe shapes do not agree: long_input_ids {li.shape}, "
                                  f"long_logits {ll.shape}")
        return cls(prompts=json.loads(meta.get("prompts", "[]")), dtype=meta.get("dtype", "float32"), **arrays)
