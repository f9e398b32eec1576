"""Small datasets for training tests, benchmarks and the demo (records of each format, written to disk).

The task is learnable by a tiny model: the prompt names a number word and the response counts on
from it ("three" -> "four five six"), in the vocabulary of `tiny_tokenizer`.

Example:
    >>> recs = task_records("alpaca", 2)
    >>> sorted(recs[0])
    ['input', 'instruction', 'output']
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine ten".split()


def _pair(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(0, len(NUMBERS) - 3)
    n = rng.randint(1, 3)
    return NUMBERS[i], " ".join(NUMBERS[i + 1:i + 1 + n])


def task_records(fmt: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of format alpaca | chat | completions | text for the counting task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, reply = _pair(rng)
        if fmt == "alpaca":
            out.append({"instruction": "count on from", "input": start, "output": reply})
        elif fmt == "completions":
            out.append({"prompt": f"count on from {start}", "completion": reply})
        elif fmt == "chat":
            out.append({"messages": [{"role": "system", "content": "answer with numbers"},
                                     {"role": "user", "content": f"count on from {start}"},
                                     {"role": "assistant", "content": reply}]})
        elif fmt == "text":
            out.append({"text": f"count on from {start} : {reply}"})
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return out


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write records as .jsonl (one a line) or .json (a list), by the file's suffix."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".json":
        p.write_text(json.dumps(records, indent=1))
    else:
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def write_split_dir(d: str | os.PathLike, fmt: str, n_train: int = 32, n_valid: int = 8, n_test: int = 0,
                    seed: int = 0) -> Path:
    """A data directory with train/valid(/test).jsonl of the counting task."""
    d = Path(d)
    for name, n, s in (("train", n_train, seed), ("valid", n_valid, seed + 1), ("test", n_test, seed + 2)):
        if n:
            write_records(d / f"{name}.jsonl", task_records(fmt, n, s))
    return d
