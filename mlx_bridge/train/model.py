"""The base model (through mlx-lm) and what is trained on it: LoRA / DoRA layers or whole blocks.

Architectures are mlx-lm's: `load_base` only resolves where the model is (a local directory or a hub
id), turns mlx-lm's failures into one-line errors, and records what the manifest needs (config,
revision, weight hashes). `apply_fine_tune` wraps `mlx_lm.tuner.utils.linear_to_lora_layers`, after
resolving the targets to block-relative module paths and checking the rank against every targeted layer.

Example:
    >>> base = load_base("path/to/mlx-model")  # doctest: +SKIP
    >>> info = apply_fine_tune(base.model, TrainConfig(lora_rank=4))  # doctest: +SKIP
    >>> info["targets"][:2]  # doctest: +SKIP
    ['mlp.down_proj', 'mlp.gate_proj']
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..errors import BridgeError, raise_all
from ..fsutil import is_hub_id, read_json
from ..hashing import DEFAULT, hash_file
from ..translate.validate import check_types, validate_model_dir
from .config import TrainConfig


@dataclass
class Base:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict  # config.json as on disk
    path: Path  # local directory
    hub_id: str | None = None
    revision: str | None = None
    _hashes: dict = field(default_factory=dict)  # algorithm -> {file: hash}

    def weight_hashes(self, algo: str = DEFAULT) -> dict[str, str]:
        """{weight file: hash} in `algo` (computed once per algorithm)."""
        if algo not in self._hashes:
            self._hashes[algo] = {p.name: hash_file(p, algo) for p in sorted(self.path.glob("model*.safetensors"))}
        return self._hashes[algo]


def _hub_download(name: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    from ..translate.source import HUB_PATTERNS

    try:  # weights, configs and tokenizer files; never code (mlx-lm's own list allows *.py)
        return Path(snapshot_download(name, revision=revision, allow_patterns=[*HUB_PATTERNS, "*.jsonl"]))
    except Exception as e:  # offline, unknown repo, auth: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BridgeError(f"model {name!r}: not a local directory, and it could not be fetched from the "
                          f"Hugging Face hub ({type(e).__name__}: {msg})") from e


def load_base(model: str, revision: str | None = None) -> Base:
    """Load a model with mlx-lm from a local directory or a hub id; errors are one line."""
    from mlx_lm.utils import _get_classes, load_model, load_tokenizer

    p = Path(model).expanduser()
    hub_id = None
    if not p.exists():
        if not is_hub_id(str(model)):
            raise BridgeError(f"model {model!r}: no such directory")
        hub_id, p = str(model), _hub_download(str(model), revision)
        revision = p.name  # the snapshot directory is named after the commit
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise BridgeError(f"{p}: no config.json (expected an MLX or Hugging Face model directory)")
    config = read_json(cfg_path)
    if "model_type" not in config:
        raise BridgeError(f"{cfg_path}: no model_type")
    raise_all(check_types(config), str(cfg_path))
    try:
        _get_classes(config)
    except ValueError as e:
        import mlx_lm

        raise BridgeError(f"{cfg_path}: model_type {config['model_type']!r} is not an architecture mlx-lm "
                          f"{mlx_lm.__version__} supports") from e
    files = sorted(p.glob("model*.safetensors"))
    if not files:
        raise BridgeError(f"{p}: no model*.safetensors weight files")
    validate_model_dir(config, files, str(cfg_path))  # before mlx-lm builds anything from the config
    try:
        net, loaded_cfg = load_model(p, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as e:
        raise BridgeError(f"{p}: mlx-lm could not build the model ({type(e).__name__}: {e})") from e
    try:  # never run a tokenizer's own code (auto_map); transformers would ask, or run it
        tokenizer = load_tokenizer(p, {"trust_remote_code": False}, eos_token_ids=loaded_cfg.get("eos_token_id"))
    except Exception as e:  # transformers and tokenizers raise many kinds for a damaged or custom tokenizer
        raise BridgeError(f"{p}: no usable tokenizer ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from e
    return Base(net, tokenizer, config, p.resolve(), hub_id, revision)


def is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "scales") for _, m in model.named_modules())


def _lora_types() -> tuple:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding, nn.QuantizedEmbedding)


def candidate_targets(model: nn.Module) -> list[str]:
    """Block-relative paths of every layer LoRA can wrap (mlx-lm's default set of keys)."""
    types = _lora_types()
    keys = set()
    for block in model.layers:
        keys |= {k for k, m in block.named_modules() if hasattr(m, "to_lora") or isinstance(m, types)}
    return sorted(keys)


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Targets as block-relative paths: a name matches a path equal to it or ending in '.name'."""
    cands = candidate_targets(model)
    if targets is None:
        return cands
    out, problems = [], []
    for t in targets:
        hits = [k for k in cands if k == t or k.endswith("." + t)]
        if not hits:
            problems.append(f"{t!r} matches no linear layer in the model's blocks (available: {', '.join(cands)})")
        out += [h for h in hits if h not in out]
    raise_all(problems, "targets")
    return sorted(out)


def _dims(m: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer LoRA can wrap."""
    if hasattr(m, "input_dims") and hasattr(m, "output_dims"):
        return m.input_dims, m.output_dims
    rows, cols = m.weight.shape[-2:]
    if hasattr(m, "bits"):
        cols = cols * 32 // m.bits
    if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
        return rows, cols
    return cols, rows


def selected_layers(model: nn.Module, num_layers: int) -> list[int]:
    n = len(model.layers)
    if num_layers > n:
        raise BridgeError(f"num_layers: {num_layers} is more than the model's {n} blocks")
    k = n if num_layers == -1 else num_layers
    return list(range(n - k, n))


def apply_fine_tune(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the model and make the chosen part trainable; return the manifest's adapter section."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    layers = selected_layers(model, cfg.num_layers)
    model.freeze()
    if cfg.fine_tune_type == "full":
        if is_quantized(model):
            raise BridgeError("fine_tune_type: full fine-tuning needs a non-quantized base (this one is "
                              "quantized: use lora or dora, i.e. QLoRA)")
        for i in layers:
            model.layers[i].unfreeze()
        return {"type": "full", "rank": None, "scale": None, "lora_alpha": None, "alpha_given_as": None,
                "dropout": None, "targets": None, "layers": layers, "num_layers": cfg.num_layers}
    keys = resolve_targets(model, cfg.targets)
    problems = []
    for i in layers:
        for k, m in model.layers[i].named_modules():
            if k in keys:
                d_in, d_out = _dims(m)
                if cfg.lora_rank > min(d_in, d_out):
                    problems.append(f"layers.{i}.{k} ({d_in} -> {d_out})")
    if problems:
        problems.sort()
        more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise BridgeError(f"lora_rank {cfg.lora_rank} is larger than {', '.join(problems[:2])}{more} "
                          "(the rank must not exceed min(in, out) of a targeted layer: lower it or leave those layers out "
                          "with targets)")
    mx.random.seed(cfg.seed)  # the LoRA initialisation
    params = {"rank": cfg.lora_rank, "scale": cfg.scale, "dropout": cfg.lora_dropout, "keys": keys}
    try:
        linear_to_lora_layers(model, cfg.num_layers, params, use_dora=cfg.fine_tune_type == "dora")
    except ValueError as e:  # DoRA on MoE experts, say
        raise BridgeError(f"fine_tune_type {cfg.fine_tune_type}: {e}") from e
    return {"type": cfg.fine_tune_type, "rank": cfg.lora_rank, "scale": cfg.scale, "lora_alpha": cfg.alpha,
            "alpha_given_as": cfg.alpha_given_as, "dropout": cfg.lora_dropout, "targets": keys,
            "layers": layers, "num_layers": cfg.num_layers}


@contextlib.contextmanager
def grad_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each block in the backward pass (mx.checkpoint); restored on exit.

    mlx-lm's `grad_checkpoint` patches the block class for good; this restores `__call__` afterwards so
    other models in the process are not affected.
    """
    if not enabled:
        yield
        return
    cls = type(model.layers[0])
    fn = cls.__call__

    def checkpointed(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return fn(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed
    try:
        yield
    finally:
        cls.__call__ = fn


def model_dtype(model: nn.Module) -> str:
    """The floating dtype the model computes in (of its first floating parameter)."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).replace("mlx.core.", "")
    return "float32"
