"""The registry: one `Arch` per model type, built from the derived data (`derived/<type>.json`, written
by scripts/derive_archs.py from mlx-lm itself) and the few facts parity tests found (`quirks.QUIRKS`).

Imports json only: the translator reads it on any machine.

Example:
    >>> get_arch({"model_type": "mixtral"}).architecture
    'MixtralForCausalLM'
    >>> get_arch({"model_type": "mistral"}).rules["model.layers.{}.self_attn.q_proj.weight"]["parts"][0]["mlx"]
    'model.layers.{}.self_attn.q_proj.weight'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import BridgeError
from .quirks import QUIRKS, Quirks

DERIVED_DIR = Path(__file__).parent / "derived"
DOCS = "docs/architectures.md"
VLM_RULES = Path(__file__).parent / "mlx_vlm.json"  # written by scripts/derive_vlm.py from mlx-vlm itself
# model_type -> the type whose entry it uses (mlx-lm MODEL_REMAPPING keeps these in one module too)
ALIASES: dict[str, str] = {}


def template(key: str) -> tuple[str, list[int]]:
    """("model.layers.{}.mlp.experts.{e}.w1.weight", [1, 3]) for "model.layers.1.mlp.experts.3.w1.weight".

    A number after "experts" is an expert index ("{e}"), any other a layer index ("{}").
    """
    parts, nums = key.split("."), []
    for i, p in enumerate(parts):
        if p.isdigit():
            nums.append(int(p))
            parts[i] = "{e}" if i and parts[i - 1] == "experts" else "{}"
    return ".".join(parts), nums


@dataclass(frozen=True)
class Arch:
    model_type: str
    architecture: str  # HF class for config.json "architectures" (transformers' auto mapping)
    config_class: str
    hf_auto: str  # "causal_lm" | "image_text_to_text"
    rules: dict  # HF tensor template -> {"parts": [...], "join", "axis"} (see derive.py)
    dropped: tuple[str, ...]  # HF tensor templates mlx-lm drops (vision towers, unused buffers)
    embeddings: tuple[str, ...]  # MLX module templates that are nn.Embedding
    linears: tuple[str, ...]  # MLX module templates mlx-lm's LoRA can wrap (Linear, SwitchLinear)
    mlx_defaults: dict  # every mlx-lm ModelArgs default
    hf_defaults: dict  # transformers' defaults for the same fields
    quirks: Quirks = field(default_factory=Quirks)
    by_mlx: dict = field(default_factory=dict)  # MLX weight template -> [(HF template, part number)]
    peft_refuses: dict = field(default_factory=dict)  # HF module template PEFT's LoRA cannot wrap -> its class
    mlx_text_defaults: dict = field(default_factory=dict)  # a multimodal wrapper's: its text model's ModelArgs defaults
    # HF module template whose adapter PEFT's own loading does not apply as written -> why ("with siblings A, B": only
    # beside adapters on those), asked of PEFT by derive_more.peft_misloads
    peft_misloads: dict = field(default_factory=dict)
    # HF module template -> its name in the model transformers builds, where they differ (PEFT adapters use that name)
    peft_names: dict = field(default_factory=dict)

    @property
    def config_defaults(self) -> dict:
        """Defaults mlx-lm computes with that differ from what transformers assumes for a missing field."""
        return {k: v for k, v in self.mlx_defaults.items()
                if k in self.hf_defaults and v is not None and self.hf_defaults[k] != v}

    @property
    def reads_rope_parameters(self) -> bool:
        """mlx-lm reads nested `rope_parameters` for this type: its ModelArgs has the field (lfm2, exaone_moe,
        granitemoehybrid take rope_theta from it; laguna, mellum per layer type), or a quirk says so."""
        return self.quirks.reads_rope_parameters or "rope_parameters" in self.mlx_defaults

    @property
    def mlx_forces(self) -> dict:
        return self.quirks.mlx_forces

    @property
    def mlx_ignores(self) -> tuple:
        return self.quirks.mlx_ignores

    def template(self, key: str) -> tuple[str, list[int]]:
        return template(key)

    def plain(self, hf_template: str) -> bool:
        """True when the HF tensor is one MLX tensor (or one expert of it) renamed, nothing computed."""
        r = self.rules[hf_template]
        return len(r["parts"]) == 1 and not set(r["parts"][0]) - {"mlx", "index"} and "merge" not in r


def _build(data: dict) -> Arch:
    by_mlx: dict[str, list] = {}
    for hf, rule in data.get("hf", {}).items():  # a refused type has no rules
        for i, p in enumerate(rule["parts"]):
            by_mlx.setdefault(p["mlx"], []).append((hf, i))
    return Arch(data["model_type"], data["hf_class"], data["config_class"], data["hf_auto"], data.get("hf", {}),
                tuple(data.get("dropped", ())), tuple(data.get("embeddings", ())), tuple(data.get("linears", ())),
                data.get("mlx_defaults", {}),
                data.get("hf_defaults", {}), QUIRKS.get(data["model_type"], Quirks()), by_mlx,
                data.get("peft_refuses", {}), data.get("mlx_text_defaults", {}), data.get("peft_misloads", {}), data.get("peft_names", {}))


@lru_cache(maxsize=None)
def _load() -> tuple[dict[str, Arch], dict[str, dict]]:
    archs, refused = {}, {}
    for p in sorted(DERIVED_DIR.glob("*.json")):
        data = json.loads(p.read_text())
        reason = QUIRKS.get(data["model_type"], Quirks()).refused or data.get("refused")
        if reason:
            refused[data["model_type"]] = {**data, "refused": reason}
        else:
            archs[data["model_type"]] = _build(data)
    return archs, refused


@lru_cache(maxsize=None)
def vlm_rules(model_type: str) -> dict:
    """How mlx-vlm names and lays out the tensors mlx-lm drops, for a base `mlx_vlm.convert` wrote:
    {"rules": {mlx-vlm template: {"hf": HF template, "perm": transpose}}}, or {"refused": reason}.

    Example:
        >>> vlm_rules("mistral3")["rules"]["vision_tower.vision_model.patch_conv.weight"]
        {'hf': 'vision_tower.patch_conv.weight', 'perm': [0, 3, 1, 2]}
    """
    types = json.loads(VLM_RULES.read_text())["types"]
    return types.get(model_type) or {"refused": f"mlx-vlm's layout of {model_type} was not derived"}


def supported() -> list[str]:
    """Model types the exporter takes."""
    return sorted(_load()[0])


def refused() -> dict[str, str]:
    """Model types mlx-lm trains that the exporter refuses -> the reason."""
    return {t: d["refused"] for t, d in sorted(_load()[1].items())}


def describe(model_type: str) -> Arch:
    """The `Arch` of any derived type, a refused one too (for tests that build tiny models of it).

    Example:
        >>> describe("gpt_oss").architecture
        'GptOssForCausalLM'
    """
    archs, ref = _load()
    mt = ALIASES.get(model_type, model_type)
    return archs[mt] if mt in archs else _build(ref[mt])


def get_arch(config: dict, source: str = "config.json") -> Arch:
    """The `Arch` for a config's `model_type`; refuses an unknown or refused type in one line.

    Raises:
        BridgeError: no model_type, a type mlx-lm/transformers do not share, or one whose rules could
            not be derived (the line points at docs/architectures.md).
    """
    mt = config.get("model_type")
    if not mt:
        raise BridgeError(f"{source}: no 'model_type'")
    mt = ALIASES.get(mt, mt)
    archs, ref = _load()
    if mt in archs:
        return archs[mt]
    if mt in ref:
        raise BridgeError(f"{source}: model_type {mt!r} is not supported ({ref[mt]['refused']}); see {DOCS}")
    raise BridgeError(f"{source}: model_type {mt!r} is not supported (not an mlx-lm type with a transformers "
                      f"class); the supported types are listed in {DOCS}")
