"""`manifest.json`: what a checkpoint or export is, written down so that nothing is guessed later.

A manifest sits beside every checkpoint (trainer) and every export (translator). Sections (all dicts,
all optional except `schema_version` and `kind`):

    schema_version  int, SCHEMA_VERSION
    kind            "checkpoint" | "export" | "base"
    base_model      {path, hub_id, revision, config (full config.json), quantization, weight_hashes: {file: hash}}
    architecture    {model_type, layout: "mlx-lm"|"hf", num_layers}
    adapter         {type: lora|dora|full, rank, scale, lora_alpha, alpha_given_as: "scale"|"lora_alpha",
                     dropout, targets: [relative module paths], layers: [ints], num_layers}
    hyperparameters {every training setting, seed included}
    dataset         {name, path, sha256, format, template, counts: {train, valid, test}}
    environment     {python, platform, mlx, mlx_lm, mlx_bridge, ...}
    training        {steps, epochs, tokens, final_train_loss, final_valid_loss, seconds, ...}
    probes          {file: "probes.safetensors", num, length, max_new_tokens}
    export          {format, dtype, source, source_hashes: {file: hash}, files: {name: hash}, seconds, ...}
    files           {name: hash} of the files in the directory
    recipe          free-form (e.g. how the demo base model was made)

A hash is `ALGORITHM:HEX` (`hashing.py`; this version writes blake3) and is checked with the algorithm
it names. Old schemas are upgraded on read by small named functions in `MIGRATIONS` (schema 1: bare
sha256 hex under `weight_sha256` / `source_sha256`).

Example:
    >>> m = Manifest(kind="checkpoint", adapter={"type": "lora", "rank": 8, "scale": 20.0})
    >>> Manifest.from_dict(m.to_dict()).adapter["rank"]
    8
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import BridgeError, raise_all

SCHEMA_VERSION = 2
FILENAME = "manifest.json"
KINDS = ("checkpoint", "export", "base")


@dataclass
class Manifest:
    kind: str = "checkpoint"
    base_model: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        d = migrate(dict(d), source)
        raise_all(validate(d), source)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read `manifest.json` from a directory or a file path."""
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        from .fsutil import read_json

        if not p.exists():
            raise BridgeError(f"{p}: no manifest")
        return cls.from_dict(read_json(p), str(p))

    def save(self, directory: str | os.PathLike) -> Path:
        p = Path(directory) / FILENAME
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str) + "\n")
        return p


def validate(d: dict) -> list[str]:
    """Problems with a manifest dict (after migration); empty when valid."""
    problems = []
    if d.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {d.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})")
    if d.get("kind") not in KINDS:
        problems.append(f"kind {d.get('kind')!r} must be one of {', '.join(KINDS)}")
    for f in fields(Manifest):
        if f.name not in ("schema_version", "kind") and not isinstance(d.get(f.name, {}), dict):
            problems.append(f"field {f.name!r} must be an object")
    if not problems:
        from .hashing import bad_values

        for where, values in hash_sections(d).items():
            problems += bad_values(values, where)
    return problems


def hash_sections(d: dict) -> dict[str, dict]:
    """{where: {name: recorded hash}}: the sections of a (schema 2) manifest dict that hold file hashes."""
    b, e = (d.get(k) if isinstance(d.get(k), dict) else {} for k in ("base_model", "export"))
    found = {"files": d.get("files"), "base_model.weight_hashes": b.get("weight_hashes"),
             "export.source_hashes": e.get("source_hashes"), "export.files": e.get("files")}
    return {k: v for k, v in found.items() if v is not None}


def _from_v0(d: dict) -> dict:
    """v0 (unversioned): `model` held the base model section and `config` the architecture config."""
    d = dict(d)
    if "model" in d and "base_model" not in d:
        d["base_model"] = d.pop("model")
    if "config" in d:
        d.setdefault("base_model", {})["config"] = d.pop("config")
    d.setdefault("kind", "checkpoint")
    d["schema_version"] = 1
    return d


def _from_v1(d: dict) -> dict:
    """v1: file hashes were bare sha256 hex, under `base_model.weight_sha256` and `export.source_sha256`."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}  # the sections changed are copies
    for section, old, new in (("base_model", "weight_sha256", "weight_hashes"), ("export", "source_sha256", "source_hashes")):
        if isinstance(d.get(section), dict) and old in d[section]:
            d[section][new] = d[section].pop(old)
    for where, values in hash_sections(d).items():
        if isinstance(values, dict):
            tagged = {k: f"sha256:{v}" if isinstance(v, str) and _SHA256.fullmatch(v) else v for k, v in values.items()}
            _section(d, where).update({where.rpartition(".")[2]: tagged})
    d["schema_version"] = 2
    return d


def _section(d: dict, where: str) -> dict:
    """The dict holding the key `where` names ("files": `d` itself; "export.files": d["export"])."""
    return d[where.partition(".")[0]] if "." in where else d


_SHA256 = re.compile(r"[0-9a-f]{64}")

# from-version -> function returning the next version
MIGRATIONS: dict[int, Callable[[dict], dict]] = {0: _from_v0, 1: _from_v1}


def migrate(d: dict, source: str = "manifest") -> dict:
    v = d.get("schema_version", 0)
    while v != SCHEMA_VERSION:
        if v not in MIGRATIONS:
            raise BridgeError(f"{source}: schema_version {v!r} is newer than this mlx-bridge understands; upgrade mlx-bridge")
        d = MIGRATIONS[v](d)
        v = d["schema_version"]
    return d


def environment(**extra: Any) -> dict:
    """Versions of the environment (python, platform, and the ML packages that are importable)."""
    from importlib import metadata

    from . import __version__

    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "mlx_bridge": __version__}
    for pkg in ("mlx", "mlx-lm", "numpy", "torch", "transformers", "peft", "safetensors"):
        try:
            env[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    env.update(extra)
    return env
