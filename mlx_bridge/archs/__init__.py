"""THE registry of architectures, one entry per Hugging Face `model_type` (everyone asks it).

Each entry (`Arch`) joins what was derived from mlx-lm and transformers by scripts/derive_archs.py
(`derived/<type>.json`: HF class, key rules MLX <-> HF, dropped tensors, mlx-lm's ModelArgs
defaults) with what parity tests found about how mlx-lm reads config.json (`quirks.py`). Tiny test
configs are in `tiny.py`, engine names in `engines.py`. Importing this package needs only json.

Example:
    >>> from mlx_bridge.archs import get_arch
    >>> get_arch({"model_type": "mixtral"}).architecture
    'MixtralForCausalLM'
"""

from __future__ import annotations

from .quirks import QUIRKS, Quirks
from .registry import ALIASES, DERIVED_DIR, DOCS, Arch, get_arch, refused, supported, template

__all__ = ["ALIASES", "Arch", "DERIVED_DIR", "DOCS", "QUIRKS", "Quirks", "get_arch", "refused", "supported",
           "template"]
