"""Datasets: read records from a local file/directory or the hub, detect their format, check them, split.

Sources:
    a .json or .jsonl file    one split, `valid` held out with the seed (`valid_fraction`)
    a directory               train/valid/test `.jsonl` or `.json` (`validation` also read as valid);
                              a missing valid split is held out from train with the seed
    a hub name                `datasets.load_dataset(name)` (lazy import); known short names in HUB_ALIASES

Formats (detected from the first record, overridable, then checked on every record):
    alpaca       instruction, output, optional input
    chat         messages [{role, content}], optional tools
    sharegpt     conversations [{from, value}] with from human/gpt/system (Unsloth's and axolotl's
                 aliases: user/input, assistant/output): read as chat, with the same loss mask
    completions  prompt, completion
    text         text

Example:
    >>> detect_format({"instruction": "add", "input": "1 2", "output": "3"})
    'alpaca'
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BridgeError, raise_all
from ..hashing import file_digest

HUB_ALIASES = {"alpaca_cleaned": "yahma/alpaca-cleaned", "alpaca": "tatsu-lab/alpaca"}
SPLITS = ("train", "valid", "test")
SPLIT_FILES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}
EXTENSIONS = (".jsonl", ".json")

# format -> (required fields, optional fields); detection order matters (chat before text)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("tools",)),
    "completions": (("prompt", "completion"), ("tools",)),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT `from` -> chat role (unsloth.chat_templates.standardize_sharegpt's aliases, plus tool)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "input": "user", "gpt": "assistant",
                  "assistant": "assistant", "output": "assistant", "tool": "tool"}


@dataclass
class Records:
    """Raw records of each split, with where each came from ("file:line") for error messages."""

    splits: dict[str, list[dict]]
    where: dict[str, list[str]]
    name: str | None = None  # hub name or the path as the user gave it
    path: str | None = None  # resolved local path
    sha256: str | None = None  # of the data files (a directory: of its split files' hashes)
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    held_out: bool = False  # valid split made from train with the seed


def read_json_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a .jsonl (one object a line) or .json (a list of objects) file, with their locations."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records, where = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BridgeError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from e
            where.append(f"{path}:{i}")
        return records, where
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BridgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and any(s in data for s in SPLIT_FILES["train"]):
        raise BridgeError(f"{path}: a JSON object of splits is not supported; use a directory of split files")
    if not isinstance(data, list):
        raise BridgeError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data, [f"{path}[{i}]" for i in range(len(data))]


def _find_split_file(d: Path, split: str) -> Path | None:
    found = [d / f"{stem}{ext}" for stem in SPLIT_FILES[split] for ext in EXTENSIONS if (d / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise BridgeError(f"{d}: several files for the {split} split: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def read_local(path: Path, name: str) -> Records:
    """Read a local file or directory of splits."""
    if path.is_file():
        if path.suffix not in EXTENSIONS:
            raise BridgeError(f"{path}: expected a .json or .jsonl file")
        records, where = read_json_records(path)
        sha = file_digest(path, "sha256").hexdigest()
        return Records({"train": records}, {"train": where}, name, str(path.resolve()), sha, {path.name: sha})
    files = {s: _find_split_file(path, s) for s in SPLITS}
    if files["train"] is None:
        raise BridgeError(f"{path}: no train.jsonl or train.json in the data directory")
    splits, where, hashes = {}, {}, {}
    for s, f in files.items():
        if f is not None:
            splits[s], where[s] = read_json_records(f)
            hashes[f.name] = file_digest(f, "sha256").hexdigest()
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
    return Records(splits, where, name, str(path.resolve()), combined, hashes)


def read_hub(name: str) -> Records:
    """Load a hub dataset with `datasets` (not a dependency: imported here, a clear error without it)."""
    hub_id = HUB_ALIASES.get(name, name)
    try:
        import datasets
    except ImportError as e:
        raise BridgeError(f"dataset {name!r}: not a local file or directory; loading {hub_id!r} from the hub "
                          "needs the `datasets` package (pip install 'mlx-bridge[hub]')") from e
    try:
        ds = datasets.load_dataset(hub_id)
    except Exception as e:  # offline, unknown name, auth: all one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BridgeError(f"dataset {name!r}: could not load {hub_id!r} from the hub ({msg})") from e
    splits, where = {}, {}
    for s in SPLITS:
        key = next((k for k in SPLIT_FILES[s] if k in ds), None)
        if key is not None:
            splits[s] = [dict(r) for r in ds[key]]
            where[s] = [f"{hub_id}[{key}][{i}]" for i in range(len(splits[s]))]
    if "train" not in splits:
        raise BridgeError(f"dataset {hub_id!r}: has no train split (splits: {', '.join(ds)})")
    fingerprints = "".join(f"{k}:{getattr(ds[k], '_fingerprint', '')}\n" for k in sorted(ds))
    return Records(splits, where, hub_id, None, hashlib.sha256(fingerprints.encode()).hexdigest())


def read_records(data: str | os.PathLike) -> Records:
    """Read a dataset given as a local path or a hub name (see the module docstring)."""
    p = Path(data).expanduser()
    if p.exists():
        return read_local(p, str(data))
    s = str(data)
    if s.endswith(EXTENSIONS) or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise BridgeError(f"{data}: no such file or directory")
    return read_hub(str(data))


def hold_out(records: Records, fraction: float, seed: int) -> Records:
    """Move a seeded `fraction` of train into valid when there is no valid split."""
    if "valid" in records.splits or fraction <= 0:
        return records
    n = len(records.splits["train"])
    k = int(round(n * fraction))
    if k == 0 or k >= n:
        return records
    perm = np.random.default_rng(seed).permutation(n)
    valid_idx, train_idx = sorted(perm[:k]), sorted(perm[k:])
    tr, wh = records.splits["train"], records.where["train"]
    records.splits = dict(records.splits, train=[tr[i] for i in train_idx], valid=[tr[i] for i in valid_idx])
    records.where = dict(records.where, train=[wh[i] for i in train_idx], valid=[wh[i] for i in valid_idx])
    records.held_out = True
    return records


def detect_format(record: object, where: str = "record") -> str:
    """The format whose required fields the record has (FORMATS order)."""
    if not isinstance(record, dict):
        raise BridgeError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    for name, (required, _) in FORMATS.items():
        if all(k in record for k in required):
            return name
    known = "; ".join(f"{n} ({'/'.join(r + o)})" for n, (r, o) in FORMATS.items())
    raise BridgeError(f"{where}: record has fields {sorted(record)}, which match no format: {known}")


def _check_message(m: object, where: str, i: int) -> list[str]:
    if not isinstance(m, dict):
        return [f"{where}: messages[{i}] must be an object"]
    p = []
    if m.get("role") not in ROLES:
        p.append(f"{where}: messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
        p.append(f"{where}: messages[{i}].content must be a string")
    return p


def sharegpt_messages(conversations: list[dict]) -> list[dict]:
    """ShareGPT turns as chat messages.

    Example:
        >>> sharegpt_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}])
        [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in conversations]


def _check_turn(t: object, where: str, i: int) -> list[str]:
    if not isinstance(t, dict):
        return [f"{where}: conversations[{i}] must be an object"]
    p = []
    if t.get("from") not in SHAREGPT_ROLES:
        p.append(f"{where}: conversations[{i}].from {t.get('from')!r} is not one of {', '.join(SHAREGPT_ROLES)}")
    if not isinstance(t.get("value"), str):
        p.append(f"{where}: conversations[{i}].value must be a string")
    return p


def check_record(r: object, fmt: str, where: str) -> list[str]:
    """Problems with one record of format `fmt` (empty when fine)."""
    if not isinstance(r, dict):
        return [f"{where}: a record must be a JSON object, got {type(r).__name__}"]
    required, optional = FORMATS[fmt]
    p = [f"{where}: missing field {k!r} ({fmt} format)" for k in required if k not in r]
    if p:
        return p
    if fmt == "sharegpt":
        turns = r["conversations"]
        if not isinstance(turns, list) or not turns:
            return [f"{where}: conversations must be a non-empty list"]
        for i, t in enumerate(turns):
            p += _check_turn(t, where, i)
        if not p and not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
            p.append(f"{where}: conversations has no gpt/assistant turn to train on")
        return p
    if fmt == "chat":
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs:
            return [f"{where}: messages must be a non-empty list"]
        for i, m in enumerate(msgs):
            p += _check_message(m, where, i)
        if not p and not any(m.get("role") == "assistant" for m in msgs):
            p.append(f"{where}: messages has no assistant message to train on")
        if "tools" in r and r["tools"] is not None and not isinstance(r["tools"], list):
            p.append(f"{where}: tools must be a list")
        return p
    for k in required + optional:
        if k in r and r[k] is not None and not isinstance(r[k], str) and k != "tools":
            p.append(f"{where}: field {k!r} must be a string, got {type(r[k]).__name__}")
    return p


def check_records(records: Records, fmt: str | None) -> str:
    """Detect (unless given) and check the format of every record; return the format name."""
    if not records.splits.get("train"):
        raise BridgeError(f"{records.name}: the train split is empty")
    fmt = fmt or detect_format(records.splits["train"][0], records.where["train"][0])
    problems = []
    for s, rs in records.splits.items():
        if not rs:
            problems.append(f"{records.name}: the {s} split is empty")
        for r, w in zip(rs, records.where[s]):
            problems += check_record(r, fmt, w)
    raise_all(problems, f"dataset ({fmt} format)")
    return fmt
