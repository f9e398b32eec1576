"""`load(export_dir)`: an exported Hugging Face directory as a `DeployedModel` in PyTorch.

Backends: "native" builds the package's own model class (`model.Transformer`, gpt-fast style, static
KV cache) for the architectures in `args.PARSERS`; "transformers" runs `AutoModelForCausalLM` (any
architecture transformers knows, never with remote code); "auto" takes native when the config is
covered and says so with a warning when it is not.

Example:
    >>> from mlx_bridge import load                               # doctest: +SKIP
    >>> m = load("deploy/alpaca", device="cuda", dtype="bfloat16")  # doctest: +SKIP
    >>> m.backend, m.max_context                                  # doctest: +SKIP
    ('native', 4096)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import BridgeError
from ..fsutil import read_json
from ..translate.validate import validate_model_dir
from .deployed import DeployedModel
from .native.weights import header_dtype, weight_files

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
BACKENDS = ("auto", "native", "transformers")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device the machine has; "auto" is CUDA when present, else CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BridgeError(f"device {device!r}: not a device name ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BridgeError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BridgeError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise BridgeError(f"device {device!r}: MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise BridgeError(f"device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype, config: dict, files: list[Path], device: torch.device) -> torch.dtype:
    """The compute dtype: "auto" is what config.json states (`dtype`/`torch_dtype`), else what the
    weights are stored in; refused when the device cannot run it.

    Example:
        >>> resolve_dtype("bf16", {}, [], torch.device("cpu"))
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif dtype == "auto":
        name = config.get("dtype") or config.get("torch_dtype") or header_dtype(files)
        if name is None:
            raise BridgeError("config.json: no dtype/torch_dtype and no floating-point weights; pass dtype=")
    else:
        name = str(dtype)
    if name not in DTYPE_NAMES:
        raise BridgeError(f"dtype {name!r}: use one of float32, bfloat16, float16 (or auto)")
    dt = DTYPE_NAMES[name]
    if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise BridgeError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} cannot run it; use float16 or float32")
    return dt


def _read_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.exists():
        extra = ""
        if (d / "adapters.safetensors").exists():
            extra = f" (an MLX checkpoint: run `mlx-bridge export {d} --out DIR` first)"
        elif (d / "adapter_config.json").exists():
            extra = " (a PEFT adapter: load its base model with PEFT)"
        raise BridgeError(f"{d}: not an export: no config.json{extra}")
    cfg = read_json(p)
    for key in ("quantization", "quantization_config"):
        if cfg.get(key):
            raise BridgeError(f"{p}: {key} is set ({json.dumps(cfg[key])[:60]}): quantized MLX weights; "
                              "export with `mlx-bridge export` to get dequantized Hugging Face weights")
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def _eos_ids(d: Path, cfg: dict, tokenizer) -> set[int]:
    """mlx-lm's rule: generation_config's eos_token_id (when set) replaces config.json's; plus the tokenizer's."""
    eos = cfg.get("eos_token_id")
    gp = d / "generation_config.json"
    if gp.exists():
        eos = read_json(gp).get("eos_token_id") or eos
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _native(d, hf_config, files, device, dtype, fast: bool):
    from .native.config import ModelArgs
    from .native.model import Transformer
    from .runners.base import NativeRunner
    from .native.weights import load_weights

    args = ModelArgs.from_hf(hf_config)
    with torch.device("meta"):
        module = Transformer(args)
    load_weights(module, files, device, dtype, drop=("lm_head.weight",) if args.tie_word_embeddings else (),
                 fp32=module.fp32_keys)
    module.reset_rope(device)
    module.stack_experts()
    module = module.eval().requires_grad_(False)
    if fast:
        from .runners.fast import FastRunner

        return module, FastRunner(module)
    return module, NativeRunner(module)


def _transformers(d, hf_config, device, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..archs import get_arch, supported
    from .runners.base import HFRunner

    mt = getattr(hf_config, "model_type", None)
    multimodal = mt in supported() and get_arch({"model_type": mt}).hf_auto == "image_text_to_text"
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM  # the class the export names

    # SDPA has no logit softcapping; some transformers releases still pick it for Gemma-2
    kw = {"attn_implementation": "eager"} if getattr(hf_config, "attn_logit_softcapping", None) else {}
    try:
        module = auto.from_pretrained(str(d), dtype=dtype, use_safetensors=True, trust_remote_code=False, **kw)
    except Exception as e:  # transformers raises many kinds for a damaged directory
        raise BridgeError(f"{d}: transformers cannot load it: {_first_line(e)}") from e
    module = module.to(device).eval().requires_grad_(False)
    return module, HFRunner(module)


def add_load_arguments(p, default_device: str = "auto") -> None:
    """The loading flags `generate` and `serve` share (device, dtype, backend, fast path, GPUs)."""
    import argparse

    p.add_argument("--device", default=default_device, help=f"cpu, cuda, cuda:N, mps or auto (default {default_device})")
    p.add_argument("--dtype", default="auto", help="auto (config.json's), float32, bfloat16 or float16")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA fast path (compiled, one CUDA graph per token; default: on for CUDA)")
    p.add_argument("--devices", default=None, metavar="cuda:0,cuda:1",
                   help="spread the layers over these GPUs (a model larger than one GPU)")


def load_from_args(path, args) -> DeployedModel:
    """`load` with the flags of `add_load_arguments`."""
    devices = [x.strip() for x in args.devices.split(",") if x.strip()] if args.devices else None
    return load(path, device=args.device, dtype=args.dtype, backend=args.backend, fast=args.fast, devices=devices)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
         backend: str = "auto", max_context: int | None = None, fast: bool | None = None,
         devices: list[str] | None = None) -> DeployedModel:
    """Load an export directory (Hugging Face layout, safetensors) for generation in PyTorch.

    Args:
        path: the export directory (config.json, model*.safetensors, tokenizer files).
        device: "cpu", "cuda", "cuda:N", "mps" or "auto".
        dtype: "auto" (config.json's dtype), "float32", "bfloat16" or "float16".
        backend: "auto", "native" (this package's classes) or "transformers".
        max_context: cap on prompt + generated tokens (default: config's max_position_embeddings).
        fast: decode with `fast.FastRunner` (fused projections, torch.compile, one CUDA graph per
            token, sampling on the device; docs/gpu.md). Default: on for CUDA with the native
            backend, off elsewhere. Greedy tokens equal the eager path's in float32 (in bf16/fp16
            they may part where the top two logits are within rounding).
        devices: spread the layers over several GPUs of this host (pipeline stages, fast path;
            `load_across`) instead of `device`.
    Returns:
        a `DeployedModel` (`.generate`, `.stream`, `.complete`, `.logits`, `.module`).
    Raises:
        BridgeError: not an export, quantized MLX weights, missing/unexpected tensors, a device or
            dtype this machine cannot run, an unknown backend.

    Example:
        >>> m = load("deploy/alpaca", device="cpu")   # doctest: +SKIP
        >>> m.generate("Hello", max_tokens=8)         # doctest: +SKIP
    """
    d = Path(path)
    if not d.is_dir():
        raise BridgeError(f"{d}: not a directory")
    if devices is not None:
        if backend == "transformers" or fast is False:
            raise BridgeError("devices=: spreading layers over GPUs needs the native backend and the fast path")
        return load_across(d, devices, dtype=dtype, max_context=max_context)
    if backend not in BACKENDS:
        raise BridgeError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    cfg = _read_config(d)
    files = weight_files(d)
    # every header and config value checked before anything is built (a damaged shard, a config
    # claiming more layers than the weights hold) -- one line naming the file
    validate_model_dir(cfg, files, str(d / "config.json"))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg, files, dev)
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if int(transformers.__version__.split(".")[0]) < 5:
        raise BridgeError(f"transformers {transformers.__version__}: deploy needs transformers>=5 "
                          "(it reads rope_parameters and layer_types as v5 normalises them)")

    try:
        hf_config = AutoConfig.from_pretrained(str(d), trust_remote_code=False)
    except Exception as e:  # ValueError, KeyError, OSError, TypeError ... for a damaged config
        raise BridgeError(f"{d / 'config.json'}: transformers cannot read it: {_first_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except Exception as e:  # a damaged tokenizer.json raises the tokenizers library's own Exception
        raise BridgeError(f"{d}: no usable tokenizer ({_first_line(e)})") from e

    from .native.config import Unsupported

    chosen = backend
    if backend in ("auto", "native"):
        try:
            module, runner = _native(d, hf_config, files, dev, dt, dev.type == "cuda" if fast is None else fast)
            chosen = "native"
        except Unsupported as e:
            if backend == "native":
                raise BridgeError(f"{d / 'config.json'}: no native class for it: {e}") from e
            warnings.warn(f"{d}: {e}: running it with transformers", stacklevel=2)
            chosen = "transformers"
    if chosen == "transformers":
        if fast:
            raise BridgeError(f"{d / 'config.json'}: fast=True needs a native class; this model runs with transformers")
        module, runner = _transformers(d, hf_config, dev, dt)

    ctx = max_context or getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if not ctx:
        raise BridgeError(f"{d / 'config.json'}: no max_position_embeddings; pass max_context=")
    return DeployedModel(module, tokenizer, cfg, dev, dt, d.resolve().name, int(ctx), _eos_ids(d, cfg, tokenizer),
                         runner, chosen)


def load_across(path: str | os.PathLike, devices: list[str] | None = None, dtype: str | torch.dtype = "auto",
                max_context: int | None = None, **runner_options) -> DeployedModel:
    """Load an export with its layers spread over `devices` (default: every CUDA GPU) and the fast
    runner (`runners.pipeline.place`: pipeline stages).

    The weights are read into host memory first (memory-mapped when the dtype matches the files),
    then each layer is moved to its GPU, so no GPU ever holds more than its share.

    Raises:
        BridgeError: what `load` raises; an architecture without a native class (use
            transformers' `device_map="auto"`, see docs/gpu.md).

    Example:
        >>> m = load_across("deploy/llama-70b", devices=["cuda:0", "cuda:1"], dtype="bfloat16")  # doctest: +SKIP
    """
    from .runners.fast import FastRunner
    from .runners.pipeline import place

    if devices is None:
        if not torch.cuda.is_available():
            raise BridgeError("devices: no CUDA device; pass devices=[...]")
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    m = load(path, device="cpu", dtype=dtype, backend="native", max_context=max_context)
    place(m.module, [resolve_device(x) for x in devices])
    runner = FastRunner(m.module, **runner_options)
    return DeployedModel(m.module, m.tokenizer, m.config, runner.device, m.dtype, m.name, m.max_context,
                         m.eos_token_ids, runner, "native")
