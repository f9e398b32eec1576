"""Registry of supported architectures, keyed by Hugging Face `model_type`.

Example:
    >>> get_arch({"model_type": "mistral"}).architecture
    'MistralForCausalLM'
"""

from __future__ import annotations

from ...errors import BridgeError
from .base import Arch
from .dense import DENSE
from .moe import MOE

REGISTRY: dict[str, Arch] = {a.model_type: a for a in DENSE + MOE}
ALIASES: dict[str, str] = {}


def supported() -> list[str]:
    return sorted(REGISTRY)


def get_arch(config: dict, source: str = "config.json") -> Arch:
    """The `Arch` for a config's `model_type`; refuses unknown types, listing the supported ones."""
    mt = config.get("model_type")
    if not mt:
        raise BridgeError(f"{source}: no 'model_type'")
    mt = ALIASES.get(mt, mt)
    if mt not in REGISTRY:
        raise BridgeError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(supported())}")
    return REGISTRY[mt]


__all__ = ["Arch", "REGISTRY", "get_arch", "supported"]
