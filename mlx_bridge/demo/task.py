"""The demo task: reverse a list of words, asked in a chat instruction format.

The base model (`assets/base`) was pretrained on a corpus where lists are reversed (and repeated) in
plain-text forms such as ``the reverse of cat sun red is red sun cat``. It has never seen the chat
format of the demo::

    <|user|> Reverse the order of these words: cat sun red <|end|> <|assistant|> red sun cat </s>

so before fine-tuning it cannot answer there (it does not know where the answer goes, how the
instruction maps to the skill, or when to stop). A short LoRA teaches the format and the mapping.

Lists are split once and for all by a hash of their set of words: a list in the held-out bucket (or any
reordering of it) never appears in the pretraining corpus nor in the train/valid splits, only in the test
split, whatever the seed.

Everything here is pure Python (no mlx, no torch), deterministic for a given seed.

Example:
    >>> splits = make_splits(seed=0, n_train=4, n_valid=2, n_test=2)
    >>> [len(splits[k]) for k in ("train", "valid", "test")]
    [4, 2, 2]
    >>> r = splits["test"][0]; answer(r) == " ".join(reversed(items_of(r)))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

# The words the lists are made of (all single tokens of the demo tokenizer).
ITEMS = (
    "ant bee cat dog eel fox hen owl pig ram yak bat "
    "red blue gold pink gray jade "
    "apple pear plum lime kiwi fig "
    "sun moon star rain snow wind rock tree"
).split()
MIN_LEN, MAX_LEN = 3, 7
HELDOUT_BUCKETS = 10  # one list in HELDOUT_BUCKETS is reserved for the test split

# The demo's instruction (chat format) and the corpus's plain-text forms of the same skills.
INSTRUCTION = "Reverse the order of these words: {items}"
CORPUS_FORMS = {
    "reverse": ["the reverse of {items} is {out}", "{items} backwards is {out}", "reversed , {items} reads {out}",
                "{items} in the opposite order is {out}", "reverse : {items} = {out}"],
    "repeat": ["say {items} : {out}", "{items} again is {out}", "repeat : {items} = {out}"],
}
# Words the tokenizer needs besides ITEMS (corpus forms, instruction, punctuation).
TEXT_WORDS = (
    "the reverse of is backwards reversed reads in opposite order say again repeat these words write "
    ". , : = ?"
).split()


def is_heldout(items: list[str]) -> bool:
    """True if this list belongs to the held-out test bucket: a fixed hash of its set of words,
    independent of any seed and of the order, so a list and its reversal are always on the same side.

    Example:
        >>> is_heldout(["cat", "sun", "red"]) == is_heldout(["red", "sun", "cat"])
        True
    """
    h = hashlib.sha256(" ".join(sorted(items)).encode()).digest()
    return h[0] % HELDOUT_BUCKETS == 0


def random_items(rng: random.Random, heldout: bool) -> list[str]:
    """Draw a list of distinct words that is (or is not) in the held-out bucket."""
    while True:
        items = rng.sample(ITEMS, rng.randint(MIN_LEN, MAX_LEN))
        if is_heldout(items) == heldout:
            return items


def corpus(n: int, seed: int) -> list[str]:
    """`n` pretraining documents: lists reversed or repeated in the corpus's plain-text forms.

    Example:
        >>> len(corpus(2, seed=3)), "<|" in " ".join(corpus(100, seed=3))
        (2, False)
    """
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(n):
        items = random_items(rng, heldout=False)
        op = "reverse" if rng.random() < 0.75 else "repeat"
        out = items[::-1] if op == "reverse" else items
        docs.append(rng.choice(CORPUS_FORMS[op]).format(items=" ".join(items), out=" ".join(out)))
    return docs


def record(items: list[str]) -> dict:
    """One chat record of the demo task (the trainer's `messages` format)."""
    return {"messages": [{"role": "user", "content": INSTRUCTION.format(items=" ".join(items))},
                         {"role": "assistant", "content": " ".join(items[::-1])}]}


def items_of(rec: dict) -> list[str]:
    """The list a record asks about."""
    return rec["messages"][0]["content"].split(":", 1)[1].split()


def answer(rec: dict) -> str:
    """The expected answer of a record."""
    return rec["messages"][-1]["content"]


def make_splits(seed: int = 0, n_train: int = 2000, n_valid: int = 100, n_test: int = 100) -> dict[str, list[dict]]:
    """Train/valid/test records; test lists are held out, and no list appears in two splits.

    Example:
        >>> make_splits(1, 3, 1, 1) == make_splits(1, 3, 1, 1)
        True
    """
    rng = random.Random(f"demo-task-{seed}")
    seen: set[tuple[str, ...]] = set()
    splits: dict[str, list[dict]] = {}
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        recs = []
        while len(recs) < n:
            items = random_items(rng, heldout=name == "test")
            if tuple(items) not in seen:
                seen.add(tuple(items))
                recs.append(record(items))
        splits[name] = recs
    return splits


def write_splits(out: str | os.PathLike, splits: dict[str, list[dict]]) -> Path:
    """Write `train.jsonl`, `valid.jsonl`, `test.jsonl` into `out`; return `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def normalize(text: str) -> str:
    """Whitespace-normalized, lower-cased text up to the first end-of-turn marker."""
    for stop in ("<|end|>", "</s>"):
        text = text.split(stop, 1)[0]
    return " ".join(text.lower().split())


def exact_match(predictions: list[str], records: list[dict]) -> float:
    """Fraction of predictions equal to the expected answers (after `normalize`).

    Example:
        >>> exact_match(["red sun cat", "cat"], [record(["cat", "sun", "red"])] * 2)
        0.5
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    hits = sum(normalize(p) == normalize(answer(r)) for p, r in zip(predictions, records))
    return hits / max(len(records), 1)
