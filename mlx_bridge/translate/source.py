"""What the user pointed `export` at: a base model, optionally an adapter on top of it.

SRC is one of
  1. an MLX model directory (config.json + model*.safetensors), plain or quantized;
  2. an mlx-lm adapter directory (adapter_config.json + adapters.safetensors; the base is the config's
     `model`, or `--base`);
  3. a checkpoint directory of this project (2. plus manifest.json naming the base).
Nothing is guessed from file names beyond these documented files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BridgeError, raise_all
from ..formats import SafetensorsFile
from ..fsutil import inside, is_hub_id, read_json
from ..manifest import FILENAME as MANIFEST, Manifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# what a hub download may fetch: weights, configs, tokenizer files; never code (*.py)
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tiktoken.model", "tokenizer.tiktoken",
                   # a multimodal checkpoint's processor (mlx-vlm conversions keep them): the export stays usable
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Model:
    """An MLX model directory: config and its weight files, opened and validated."""

    path: Path
    config: dict
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile] = field(default_factory=dict)  # tensor name -> file

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Model":
        path = Path(path)
        if not path.is_dir():
            raise BridgeError(f"{path}: not a directory")
        config = read_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.exists():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise BridgeError(f"{index}: no weight_map object")
            names = sorted({str(inside(path, n, str(index)).relative_to(path)) for n in wm.values()})
            missing = [n for n in names if not (path / n).exists()]
            if missing:
                raise BridgeError(f"{index}: weight_map names missing files {missing}")
        else:
            names = sorted(p.name for p in path.glob("model*.safetensors"))
        if not names:
            raise BridgeError(f"{path}: no model*.safetensors weight files")
        files = [SafetensorsFile(path / n) for n in names]
        where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                if k in where:
                    raise BridgeError(f"{f.path}: tensor {k!r} also in {where[k].path}")
                where[k] = f
        return cls(path, config, files, where)

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization") or self.config.get("quantization_config")

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class Adapter:
    """mlx-lm adapter weights and settings (LoRA, DoRA or full fine-tune)."""

    path: Path
    config: dict  # adapter_config.json
    file: SafetensorsFile
    manifest: Manifest | None

    @staticmethod
    def check(c: dict, where: str) -> None:
        """Refuse adapter_config.json settings of the wrong type or out of range, naming each field."""
        problems = []
        ft = c.get("fine_tune_type", "lora")
        if ft not in ("lora", "dora", "full"):
            problems.append(f"fine_tune_type: {ft!r}, expected 'lora', 'dora' or 'full'")
        lp = c.get("lora_parameters")
        if lp is not None and not isinstance(lp, dict):
            problems.append(f"lora_parameters: {lp!r} ({type(lp).__name__}), expected an object")
            lp = None
        lp = lp or {}
        if "rank" in lp and not (_int(lp["rank"]) and lp["rank"] > 0):
            problems.append(f"lora_parameters.rank: {lp['rank']!r}, expected a positive integer")
        if "scale" in lp and not (_num(lp["scale"]) and math.isfinite(lp["scale"])):
            problems.append(f"lora_parameters.scale: {lp['scale']!r}, expected a finite number")
        if lp.get("dropout") is not None and not (_num(lp["dropout"]) and 0 <= lp["dropout"] < 1):
            problems.append(f"lora_parameters.dropout: {lp['dropout']!r}, expected a number in [0, 1)")
        keys = lp.get("keys")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            problems.append(f"lora_parameters.keys: {keys!r}, expected a list of module names")
        nl = c.get("num_layers")
        if nl is not None and not _int(nl):
            problems.append(f"num_layers: {nl!r} ({type(nl).__name__}), expected an integer")
        if c.get("model") is not None and not isinstance(c["model"], str):
            problems.append(f"model: {c['model']!r}, expected a path or hub id")
        raise_all(problems, where)

    @property
    def fine_tune_type(self) -> str:
        return self.config.get("fine_tune_type", "lora")

    @property
    def lora(self) -> dict:
        return self.config.get("lora_parameters") or {}

    @property
    def scale(self) -> float:
        return float(self.lora.get("scale", 20.0))


@dataclass
class Source:
    path: Path
    base: Model
    adapter: Adapter | None
    manifest: Manifest | None  # the checkpoint's (or base dir's) manifest, if any
    hf_base: Model | None = None  # the HF checkpoint of the base (for the tensors mlx-lm drops)

    def close(self) -> None:
        self.base.close()
        if self.hf_base:
            self.hf_base.close()
        if self.adapter:
            self.adapter.file.close()


def resolve_model(ref: str, where: str, relative_to: Path | None = None) -> Path:
    """A base model reference (local path or hub id) as a local directory.

    A relative path is tried from the working directory, then from `relative_to` (the adapter's
    directory: mlx-lm records the path as given when training). Hub ids go through
    `huggingface_hub` (its cache first); offline and uncached, one clear error.
    """
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if relative_to is not None and not p.is_absolute() and (relative_to / p).is_dir():
        return relative_to / p
    if not is_hub_id(ref):
        raise BridgeError(f"{where}: base model {ref!r} is not a directory (and not a hub id); pass --base DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise BridgeError(f"{where}: base model {ref!r} is a hub id; install huggingface_hub or pass --base DIR") from e
    try:
        return Path(snapshot_download(ref, allow_patterns=list(HUB_PATTERNS)))
    except Exception as e:  # offline, missing repo, auth
        raise BridgeError(f"{where}: cannot fetch base model {ref!r} ({type(e).__name__}); pass --base DIR") from e


def _hf_base(path: str | os.PathLike | None) -> Model | None:
    if path is None:
        return None
    if not Path(path).is_dir():
        raise BridgeError(f"--hf-base {path}: not a directory")
    return Model.open(path)


def open_source(src: str | os.PathLike, base: str | os.PathLike | None = None,
                hf_base: str | os.PathLike | None = None) -> Source:
    """Open SRC (model, adapter or checkpoint dir) and its base model.

    Example:
        >>> s = open_source("ckpt/")        # doctest: +SKIP
        >>> s.base.config["model_type"], s.adapter.fine_tune_type   # doctest: +SKIP
        ('llama', 'lora')
    """
    src = Path(src)
    if not src.is_dir():
        raise BridgeError(f"{src}: not a directory")
    manifest = Manifest.load(src) if (src / MANIFEST).exists() else None
    if (src / ADAPTER_CONFIG).exists() or (src / ADAPTER_WEIGHTS).exists():
        cfg = read_json(src / ADAPTER_CONFIG)
        Adapter.check(cfg, str(src / ADAPTER_CONFIG))
        if not (src / ADAPTER_WEIGHTS).exists():
            raise BridgeError(f"{src / ADAPTER_WEIGHTS}: missing (adapter_config.json is there)")
        if base is not None:
            base_dir = Path(base)
            if not base_dir.is_dir():
                raise BridgeError(f"--base {base}: not a directory")
        else:
            ref = None
            if manifest and manifest.base_model:
                ref = manifest.base_model.get("path") or manifest.base_model.get("hub_id")
                if ref and not Path(ref).is_dir() and manifest.base_model.get("hub_id"):
                    ref = manifest.base_model["hub_id"]
            ref = ref or cfg.get("model")
            if not ref:
                raise BridgeError(f"{src / ADAPTER_CONFIG}: no 'model' naming the base; pass --base DIR")
            base_dir = resolve_model(str(ref), str(src / (MANIFEST if manifest else ADAPTER_CONFIG)), src)
        adapter = Adapter(src, cfg, SafetensorsFile(src / ADAPTER_WEIGHTS), manifest)
        return Source(src, Model.open(base_dir), adapter, manifest, _hf_base(hf_base))
    if (src / "config.json").exists():
        return Source(src, Model.open(src), None, manifest, _hf_base(hf_base))
    raise BridgeError(f"{src}: neither a model directory (config.json) nor an adapter/checkpoint directory "
                      f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
