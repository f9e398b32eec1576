"""Training settings: one dataclass, its checks, and the YAML file that can set them.

Precedence (the `mlx-bridge train` CLI): command-line flags, then the YAML `--config`, then the defaults
below. The defaults follow mlx-lm's `lora.py` where it has one (rank 8, scale 20, Adam, lr 1e-5,
batch 4, max length 2048, validation every 200 steps on 25 batches), except `num_layers`, which is -1
(every block, as PEFT does).

Example:
    >>> cfg = TrainConfig(lora_rank=16, lora_alpha=32)
    >>> cfg.validate(); cfg.scale, cfg.alpha, cfg.alpha_given_as
    (2.0, 32.0, 'lora_alpha')
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import BridgeError, raise_all

FINE_TUNE_TYPES = ("lora", "dora", "full")
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
DATA_FORMATS = ("alpaca", "chat", "sharegpt", "completions", "text")
TEMPLATES = ("chat_template", "alpaca", "plain")
DEFAULT_SCALE = 20.0  # mlx-lm's default LoRA scale

# settings that only change how a run is observed, not what it computes (may differ on resume)
OBSERVATION_KEYS = ("save_every", "keep_last", "eval_every", "val_batches", "steps_per_report", "quiet")


@dataclass
class TrainConfig:
    # adapter
    fine_tune_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None  # PEFT convention: scale = lora_alpha / rank
    lora_scale: float | None = None  # mlx-lm convention; DEFAULT_SCALE when neither is given
    lora_dropout: float = 0.0
    targets: list[str] | None = None  # module names inside a block ("q_proj" or "self_attn.q_proj")
    num_layers: int = -1  # the last N blocks; -1 = all
    # length of the run
    epochs: float | None = None
    iters: int | None = None  # optimizer steps; one epoch when neither is given
    # optimisation
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup: int = 0
    min_lr: float = 0.0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    grad_checkpoint: bool = False
    compile: bool = True
    seed: int = 0
    # data
    data_format: str | None = None  # detected from the records when None
    template: str | None = None  # chat_template when the tokenizer has one, else alpaca/plain
    mask_prompt: bool | None = None  # loss on the response only; None = yes for formats with a prompt
    max_seq_len: int = 2048
    valid_fraction: float = 0.1  # held out with the seed when the data has no valid split
    # observation
    save_every: int = 0  # optimizer steps between numbered checkpoints (0 = only the final one)
    keep_last: int = 0  # numbered checkpoints kept (0 = all)
    eval_every: int = 200  # validation at step 0, every N steps and at the end (0 = only at the end)
    val_batches: int = 25  # batches per validation (-1 = the whole validation split)
    steps_per_report: int = 10  # eval_every, val_batches, steps_per_report: mlx_lm.lora's CONFIG_DEFAULTS
    quiet: bool = False

    @property
    def scale(self) -> float:
        if self.lora_scale is not None:
            return float(self.lora_scale)
        if self.lora_alpha is not None:
            return float(self.lora_alpha) / self.lora_rank
        return DEFAULT_SCALE

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else self.scale * self.lora_rank

    @property
    def alpha_given_as(self) -> str:
        return "lora_alpha" if self.lora_alpha is not None else "scale"

    def validate(self) -> None:
        """Raise one BridgeError listing every bad setting."""
        p = []
        choice = {"fine_tune_type": FINE_TUNE_TYPES, "lr_schedule": SCHEDULES, "optimizer": OPTIMIZERS}
        for k, allowed in choice.items():
            if getattr(self, k) not in allowed:
                p.append(f"{k}: {getattr(self, k)!r} is not one of {', '.join(allowed)}")
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            p.append(f"data_format: {self.data_format!r} is not one of {', '.join(DATA_FORMATS)}")
        if self.template is not None and self.template not in TEMPLATES:
            p.append(f"template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        for k in ("lora_rank", "batch_size", "grad_accum", "steps_per_report"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                p.append(f"{k}: must be a positive integer, got {getattr(self, k)!r}")
        if self.max_seq_len < 2:
            p.append(f"max_seq_len: must be at least 2, got {self.max_seq_len}")
        for k in ("warmup", "save_every", "keep_last", "eval_every"):
            if getattr(self, k) < 0:
                p.append(f"{k}: must be >= 0, got {getattr(self, k)}")
        if self.keep_last and not self.save_every:
            p.append(f"keep_last: {self.keep_last} numbered checkpoints need save_every (they are written every "
                     "save_every steps)")
        if self.num_layers == 0 or self.num_layers < -1:
            p.append(f"num_layers: must be -1 (all blocks) or a positive count, got {self.num_layers}")
        if self.lora_alpha is not None and self.lora_scale is not None:
            p.append("lora_alpha and lora_scale: give one of them, not both (lora_alpha = scale * rank)")
        if self.learning_rate <= 0:
            p.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.valid_fraction < 1.0:
            p.append(f"valid_fraction: must be in [0, 1), got {self.valid_fraction}")
        if self.epochs is not None and self.iters is not None:
            p.append("epochs and iters: give one of them, not both")
        if self.epochs is not None and self.epochs <= 0:
            p.append(f"epochs: must be > 0, got {self.epochs}")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 1):
            p.append(f"iters: must be a positive integer, got {self.iters!r}")
        if self.targets is not None and (not isinstance(self.targets, list) or not self.targets):
            p.append(f"targets: must be a non-empty list of module names, got {self.targets!r}")
        if self.fine_tune_type == "full" and self.targets is not None:
            p.append("targets: only apply to lora/dora (full fine-tuning trains whole blocks)")
        raise_all(p, "training settings")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(lora_scale_effective=self.scale, lora_alpha_effective=self.alpha)
        return d

    def computational(self) -> dict:
        """The settings that decide what a run computes (compared when resuming)."""
        return {k: v for k, v in asdict(self).items() if k not in OBSERVATION_KEYS}


FIELDS = {f.name: f for f in fields(TrainConfig)}
# YAML aliases (mlx-lm's lora.py names) -> TrainConfig names
ALIASES = {"lr": "learning_rate", "rank": "lora_rank", "grad_accumulation_steps": "grad_accum",
           "max_seq_length": "max_seq_len", "format": "data_format", "steps_per_eval": "eval_every",
           "iterations": "iters"}
# keys that a YAML file may set besides TrainConfig's fields
RUN_KEYS = ("model", "data", "out", "resume", "force", "revision")
# mlx-lm's `lora_parameters` block -> TrainConfig names
LORA_PARAMETERS = {"rank": "lora_rank", "scale": "lora_scale", "alpha": "lora_alpha", "dropout": "lora_dropout",
                   "keys": "targets"}


def normalize(d: dict, source: str) -> dict:
    """Map a YAML/kwargs dict onto TrainConfig and run keys; unknown keys are an error.

    Example:
        >>> normalize({"lr": 1e-4, "lora-rank": 4, "lora_parameters": {"scale": 2.0}}, "x.yaml")
        {'learning_rate': 0.0001, 'lora_rank': 4, 'lora_scale': 2.0}
    """
    out: dict[str, Any] = {}
    problems = []
    for key, value in d.items():
        k = str(key).replace("-", "_")
        k = ALIASES.get(k, k)
        if k == "lora_parameters" and isinstance(value, dict):
            for lk, lv in value.items():
                if lk not in LORA_PARAMETERS:
                    problems.append(f"lora_parameters.{lk}: unknown key (known: {', '.join(LORA_PARAMETERS)})")
                else:
                    out[LORA_PARAMETERS[lk]] = lv
        elif k in FIELDS or k in RUN_KEYS:
            out[k] = value
        else:
            problems.append(f"{key}: unknown setting")
    if isinstance(out.get("targets"), str):
        out["targets"] = [t.strip() for t in out["targets"].split(",") if t.strip()]
    raise_all(problems, source)
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file into normalized settings (see `normalize`)."""
    import yaml

    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise BridgeError(f"{p}: config file not found") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise BridgeError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from e
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise BridgeError(f"{p}: must hold a mapping of settings, got {type(d).__name__}")
    return normalize(d, str(p))


def make_config(**settings: Any) -> TrainConfig:
    """Build and validate a TrainConfig from keyword settings (aliases allowed)."""
    d = normalize(settings, "settings")
    run = [k for k in d if k in RUN_KEYS]
    if run:
        raise BridgeError(f"settings: {', '.join(run)} are not training settings")
    cfg = TrainConfig(**d)
    _coerce(cfg)
    cfg.validate()
    return cfg


def _coerce(cfg: TrainConfig) -> None:
    """YAML gives ints where floats are meant (lr: 1) and strings for numbers (lr: 1e-4 in YAML 1.1)."""
    problems = []
    for name in ("learning_rate", "min_lr", "weight_decay", "lora_dropout", "valid_fraction", "lora_alpha",
                 "lora_scale", "epochs"):
        v = getattr(cfg, name)
        if v is None:
            continue
        try:
            setattr(cfg, name, float(v))
        except (TypeError, ValueError):
            problems.append(f"{name}: expected a number, got {v!r}")
    for name in ("lora_rank", "batch_size", "grad_accum", "warmup", "max_seq_len", "save_every", "keep_last", "eval_every",
                 "val_batches", "seed", "num_layers", "iters", "steps_per_report"):
        v = getattr(cfg, name)
        if v is None:
            continue
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            problems.append(f"{name}: expected an integer, got {v!r}")
            continue
        try:
            setattr(cfg, name, int(v))
        except (TypeError, ValueError):
            problems.append(f"{name}: expected an integer, got {v!r}")
    raise_all(problems, "training settings")
