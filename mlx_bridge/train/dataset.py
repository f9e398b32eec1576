"""A dataset ready to train on: records read, checked, split, tokenized, with its manifest identity.

`prepare(data, tokenizer, cfg)` takes a local path, a hub name, a list of records or a dict of splits
{"train": [...], "valid": [...], "test": [...]} and returns a `TokenizedData`.

Example:
    >>> td = prepare([{"prompt": "hi", "completion": "hello"}] * 4, tokenizer, TrainConfig())  # doctest: +SKIP
    >>> td.info["format"], td.info["counts"]["train"]  # doctest: +SKIP
    ('completions', 4)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import BridgeError
from .config import TrainConfig
from .data import SPLITS, Records, check_records, hold_out, read_records
from .templates import Example, resolve_template, tokenize_split


@dataclass
class TokenizedData:
    examples: dict[str, list[Example]]  # split -> examples
    info: dict  # the manifest's dataset section


def _in_memory(data: list | dict) -> Records:
    splits = {"train": data} if isinstance(data, list) else dict(data)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise BridgeError(f"dataset: unknown splits {unknown} (expected {', '.join(SPLITS)})")
    for s, rs in splits.items():
        if not isinstance(rs, list):
            raise BridgeError(f"dataset[{s!r}]: must be a list of records")
    where = {s: [f"dataset[{s!r}][{i}]" for i in range(len(rs))] for s, rs in splits.items()}
    sha = hashlib.sha256(json.dumps(splits, sort_keys=True, default=str).encode()).hexdigest()
    return Records(splits, where, name="<in-memory>", sha256=sha)


@dataclass
class CheckedData:
    """Records read, split and checked, before any tokenizer is involved (see `check_data`)."""

    records: Records
    format: str
    mask_prompt: bool


def check_data(data, cfg: TrainConfig) -> CheckedData:
    """Read, split and check every record of `data`: what can go wrong with a dataset without the model
    (a missing file, bad JSON, a record of the wrong shape) fails here, before the model is loaded.

    Example:
        >>> check_data([{"prompt": "hi", "completion": "hello"}] * 4, TrainConfig()).format
        'completions'
    """
    records = _in_memory(data) if isinstance(data, (list, dict)) else read_records(data)
    records = hold_out(records, cfg.valid_fraction, cfg.seed)
    fmt = check_records(records, cfg.data_format)
    if cfg.mask_prompt and fmt == "text":
        raise BridgeError("mask_prompt: the text format has no prompt to mask (use --no-mask-prompt)")
    mask_prompt = fmt != "text" if cfg.mask_prompt is None else cfg.mask_prompt
    return CheckedData(records, fmt, mask_prompt)


def prepare(data, tokenizer, cfg: TrainConfig, context: int | None = None) -> TokenizedData:
    """Check (unless `data` is a `CheckedData` already) and tokenize `data` (see the module docstring).

    Examples longer than `max_seq_len`, or than the model's `context` when that is shorter, are
    truncated, with one warning per split that says how many.
    """
    checked = data if isinstance(data, CheckedData) else check_data(data, cfg)
    records, fmt, mask_prompt = checked.records, checked.format, checked.mask_prompt
    template = resolve_template(fmt, tokenizer, cfg.template)
    examples, stats = {}, {}
    for s, rs in records.splits.items():
        examples[s], stats[s] = tokenize_split(rs, records.where[s], fmt, template, tokenizer, mask_prompt,
                                               cfg.max_seq_len, s, context, cfg.quiet)
    info = {
        "name": records.name, "path": records.path, "sha256": records.sha256, "files": records.files,
        "format": fmt, "template": template, "mask_prompt": mask_prompt,
        "valid_held_out": {"fraction": cfg.valid_fraction, "seed": cfg.seed} if records.held_out else None,
        "counts": {s: len(records.splits.get(s, [])) for s in SPLITS},
        "tokenized": stats,
    }
    return TokenizedData(examples, info)
