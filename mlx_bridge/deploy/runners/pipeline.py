"""A model larger than one GPU: the native class spread over the GPUs of one host (pipeline stages).

`place(module, devices)` puts contiguous blocks of decoder layers on each device, balanced by bytes
(embedding on the first, final norm and lm_head on the last). `FastRunner` then runs each device's
block as its own CUDA graph and hands the hidden state (B, 1, D) from one GPU to the next: a
decode step moves a few kilobytes between GPUs, and every GPU streams only its own weights. Stages
run one after another (no micro-batching), so the step time is the sum of the stages': the point is
fitting the model, at the speed of one GPU with all the memory of several. For more than one host,
or tensor parallelism, serve the export with vLLM (`vllm serve DIR --tensor-parallel-size N
--pipeline-parallel-size M`): the export is a plain Hugging Face directory.

`loader.load(DIR, devices=[...])` (`loader.load_across`) loads the weights, calls `place` and builds
the runner; this module imports nothing from the loader (no import cycle).

Example:
    >>> from mlx_bridge import load                                    # doctest: +SKIP
    >>> m = load("deploy/llama-70b", devices=["cuda:0", "cuda:1"], dtype="bfloat16")  # doctest: +SKIP
    >>> m.generate("Hello", max_tokens=16)                            # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ...errors import BridgeError
from ..native.model import Transformer


def _bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def split_layers(sizes: list[int], first: int, last: int, n: int) -> list[int]:
    """Device index of each layer: contiguous blocks with about equal bytes per device, counting the
    embedding (`first`) on device 0 and the head (`last`) on device n-1.

    Example:
        >>> split_layers([10] * 8, 0, 0, 2)
        [0, 0, 0, 0, 1, 1, 1, 1]
        >>> split_layers([10] * 8, 40, 0, 2)
        [0, 0, 1, 1, 1, 1, 1, 1]
    """
    total = first + sum(sizes) + last
    out, acc = [], first
    for s in sizes:
        mid = acc + s / 2  # a layer goes where its middle falls
        out.append(min(n - 1, int(mid * n / total)))
        acc += s
    return out


def place(module: Transformer, devices: list[torch.device]) -> list[int]:
    """Move a native `Transformer` (before `FastRunner` fuses it) across `devices` (resolved, e.g. by
    `loader.resolve_device`); the device index of each layer.

    Example:
        >>> place(model.module, [torch.device("cuda:0"), torch.device("cuda:1")])  # doctest: +SKIP
        [0, 0, ..., 1, 1]
    """
    devs = [torch.device(d) for d in devices]
    if not devs:
        raise BridgeError("devices: give at least one device")
    layers = module.model.layers
    plan = split_layers([_bytes(l) for l in layers], _bytes(module.model.embed_tokens),
                        _bytes(module.model.norm) + (_bytes(module.lm_head) if hasattr(module, "lm_head") else 0),
                        len(devs))
    module.model.embed_tokens.to(devs[0])
    for layer, j in zip(layers, plan):
        layer.to(devs[j])
    module.model.norm.to(devs[-1])
    if hasattr(module, "lm_head"):
        module.lm_head.to(devs[-1])
    module.reset_rope(devs[0])
    return plan
