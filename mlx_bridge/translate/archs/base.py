"""What an architecture module declares: its Hugging Face parameter table and how MLX differs.

Templates use "{}" for the layer index and "{e}" for the expert index. A dense architecture whose
mlx-lm layout equals the HF layout needs only `params`; an MoE architecture adds `experts`, which maps
each module mlx-lm stacks (E, out, in) to the per-expert HF module it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Arch:
    model_type: str
    architecture: str  # HF class name for config.json "architectures"
    params: tuple[str, ...]  # HF parameter templates, e.g. "model.layers.{}.self_attn.q_proj.weight"
    experts: dict[str, str] = field(default_factory=dict)  # MLX stacked module -> HF per-expert module ("{e}")
    num_experts_key: str = "num_local_experts"
    # mlx-lm ModelArgs defaults (mlx-lm 0.32.2) for fields that mlx-lm reads from config.json; when the
    # config lacks one, MLX computed with this value, so the export writes it explicitly.
    mlx_defaults: dict = field(default_factory=dict)
    # mlx-lm reads nested `rope_parameters` (transformers v5) for this arch; else only top-level
    # rope_theta / rope_scaling
    reads_rope_parameters: bool = False
    # config fields mlx-lm does not implement for this arch: MLX computed as if they were null
    mlx_ignores: tuple[str, ...] = ()
    # config values mlx-lm computes with whatever config.json says (e.g. the exact GELU it hard-codes)
    mlx_forces: dict = field(default_factory=dict)
    optional_bias: bool = True  # a Linear in the table may also carry ".bias" (attention_bias, mlp_bias...)

    def template(self, key: str) -> tuple[str, list[int]]:
        """("model.layers.{}.mlp.up_proj.weight", [3]) for "model.layers.3.mlp.up_proj.weight"."""
        idx = [int(m) for m in _LAYER.findall(key)]
        return _LAYER.sub(".{}.", key), idx

    def hf_params(self) -> set[str]:
        out = set(self.params)
        if self.optional_bias:
            out |= {p[: -len(".weight")] + ".bias" for p in self.params if p.endswith("_proj.weight")}
        return out
