"""Verify: does the export compute what MLX computed? (`verify(export_dir, against=None) -> dict`)"""

from __future__ import annotations

__all__ = ["verify", "summary"]


def __getattr__(name: str):
    if name in __all__:
        from . import parity

        return getattr(parity, name)
    raise AttributeError(f"module 'mlx_bridge.verify' has no attribute {name!r}")
