"""Deploy: exported models in PyTorch (native classes or transformers), generation, serving.

    from mlx_bridge.deploy import load
    model = load("deploy/alpaca", device="cuda")
"""

from __future__ import annotations

__all__ = ["load", "DeployedModel", "Completion"]


def __getattr__(name: str):
    if name == "load":
        from .loader import load

        return load
    if name == "DeployedModel":
        from .deployed import DeployedModel

        return DeployedModel
    if name == "Completion":
        from .generation import Completion

        return Completion
    raise AttributeError(f"module 'mlx_bridge.deploy' has no attribute {name!r}")
