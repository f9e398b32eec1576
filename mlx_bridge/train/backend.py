"""Which MLX backend trains (metal, cuda or cpu) and on what device, and what that means for the run.

The same MLXTrainer code runs on an Apple GPU (Metal), an NVIDIA GPU (`mlx[cuda13]` / `mlx[cuda12]`
on Linux) or the CPU; `backend_info()` says which one MLX will use, for the manifest and the first
line the trainer prints. Two CUDA facts matter downstream:

- float32 matmuls run in TF32 there unless `MLX_ENABLE_TF32=0` (MLX's default, as PyTorch's
  `allow_tf32`), so probes a float32 model computes on CUDA are labelled "tfloat32" and `verify`
  compares against them at that precision (`probe_dtype`);
- a kernel MLX's CUDA backend lacks fails inside the step with MLX's "[primitive] No implementation
  for ..." error; `refuse_missing_kernels` turns it into one line naming the kernel and the backend.

Example:
    >>> info = backend_info()
    >>> info["backend"] in ("metal", "cuda", "cpu")
    True
    >>> probe_dtype("bfloat16")
    'bfloat16'
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import mlx.core as mx

from ..errors import BridgeError

# what MLX's backends say when a primitive has no kernel for the case at hand
_MISSING = ("No implementation", "not implemented", "Not implemented", "not supported", "Not supported")


def _device(device: mx.Device | mx.DeviceType | None) -> mx.Device:
    if device is None:
        return mx.default_device()
    return mx.Device(device) if isinstance(device, mx.DeviceType) else device


def backend_name(device: mx.Device | mx.DeviceType | None = None) -> str:
    """"metal", "cuda" or "cpu": where arrays on `device` (default: MLX's default device) are computed."""
    device = _device(device)
    if device.type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "gpu"  # a GPU backend this MLX build does not name


def backend_info(device: mx.Device | mx.DeviceType | None = None) -> dict:
    """{backend, device (the chip's name), device_arch, device_memory_gb, tf32 (cuda)} from `mx.device_info`.

    Example: {"backend": "cuda", "device": "NVIDIA H200", "device_arch": "sm_90", "device_memory_gb": 150.0,
    "tf32": True}.
    """
    device = _device(device)
    try:
        raw = mx.device_info(device)
    except (RuntimeError, ValueError):  # a device MLX cannot describe: name the backend only
        raw = {}
    info: dict = {"backend": backend_name(device), "device": str(raw.get("device_name") or device)}
    if raw.get("architecture"):
        info["device_arch"] = str(raw["architecture"])
    memory = raw.get("total_memory") or raw.get("memory_size")
    if memory:
        info["device_memory_gb"] = round(int(memory) / 1e9, 1)
    if info["backend"] == "cuda":
        info["tf32"] = tf32_enabled()
    return info


def tf32_enabled() -> bool:
    """MLX's CUDA matmuls on float32 use TF32 unless MLX_ENABLE_TF32=0 (read once by MLX, as here)."""
    return os.environ.get("MLX_ENABLE_TF32", "1").strip() not in ("0", "")


def probe_dtype(model_dtype: str, device: mx.Device | mx.DeviceType | None = None) -> str:
    """The precision the probes of a `model_dtype` model are computed in on this backend.

    float32 on CUDA with TF32 on is "tfloat32" (10-bit mantissa, as float16): a float32 export is then
    checked against those probes with float16's tolerance instead of float32's.
    """
    if model_dtype == "float32" and backend_name(device) == "cuda" and tf32_enabled():
        return "tfloat32"
    return model_dtype


def describe(info: dict) -> str:
    """One phrase for the terminal, e.g. 'cuda (NVIDIA H200, sm_90, 150 GB)'."""
    extra = [x for x in (info.get("device"), info.get("device_arch"),
                         f"{info['device_memory_gb']:g} GB" if info.get("device_memory_gb") else None) if x]
    return f"{info['backend']} ({', '.join(extra)})" if extra else info["backend"]


@contextlib.contextmanager
def refuse_missing_kernels() -> Iterator[None]:
    """Turn MLX's 'no kernel for this case' RuntimeError into a one-line BridgeError naming it.

    Example (on a backend without the kernel):
        BridgeError: MLX 0.32.4 on cuda has no kernel for this run: [quantized_matmul] No implementation
        for problem shape: ... (QLoRA with these quantization settings cannot train here)
    """
    try:
        yield
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not any(m in msg for m in _MISSING):
            raise
        hint = " (QLoRA with these quantization settings cannot train here)" if "quantized" in msg.lower() else ""
        raise BridgeError(f"MLX {mx.__version__} on {backend_name()} has no kernel for this run: {msg}{hint}") from None
