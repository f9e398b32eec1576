"""MLX Bridge: fine-tune with MLX, deploy the same function with PyTorch.

The public API is imported lazily so that `import mlx_bridge` pulls in neither mlx nor torch:

    from mlx_bridge import MLXTrainer, export, load, Manifest
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["MLXTrainer", "export", "load", "Manifest", "__version__"]

_LAZY = {
    "MLXTrainer": ("mlx_bridge.train.trainer", "MLXTrainer"),
    "export": ("mlx_bridge.translate.export", "export"),
    "load": ("mlx_bridge.deploy.loader", "load"),
    "Manifest": ("mlx_bridge.manifest", "Manifest"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mlx_bridge' has no attribute {name!r}")
