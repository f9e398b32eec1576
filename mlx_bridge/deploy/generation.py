"""The decoding loop shared by every backend, stop strings and streaming detokenization.

Semantics follow `mlx_lm.stream_generate`: at most `max_tokens` tokens are drawn; an EOS token (any id
of generation_config's `eos_token_id`, else config.json's, plus the tokenizer's) ends a row and is
not part of the output; text is `tokenizer.decode(tokens)` with special tokens kept, as mlx-lm's
detokenizer gives it. Stop strings end a row too; the text is cut before the stop string.

Example:
    >>> find_stop("one two. three", [".", "two"])
    4
    >>> holdback("the answer is ab", ["abc"])
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .sampling import sample


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


def find_stop(text: str, stops: list[str] | None) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops or () if s) if i >= 0]
    return min(hits) if hits else None


def holdback(text: str, stops: list[str] | None) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    n = 0
    for s in stops or ():
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def token_steps(runner, prompts: list[list[int]], budget: int, device, *, temperature: float, top_p: float,
                top_k: int, seed: int | None, pad_id: int = 0) -> Iterator[list[int]]:
    """Yield the next token of every row, `budget` times at most (the caller stops early).

    Prompts of different lengths are left-padded; each row keeps its own rope positions and never
    attends to padding, so a row's tokens are the ones it would get alone. A runner with its own
    loop (`fast.FastRunner.steps`: tokens chosen on the device) runs it instead of this one.
    """
    for chunk in token_chunks(runner, prompts, budget, device, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, pad_id=pad_id):
        yield from chunk


def token_chunks(runner, prompts: list[list[int]], budget: int, device, *, temperature: float, top_p: float,
                 top_k: int, seed: int | None, pad_id: int = 0) -> Iterator[list[list[int]]]:
    """`token_steps` in the chunks the runner delivers them: lists of steps (each the next token of
    every row). The fast runner syncs with the host every few steps and hands over all of them at
    once, so a consumer decodes text once per chunk instead of once per token."""
    lens = [len(p) for p in prompts]
    P = max(lens)
    tokens = torch.tensor([[pad_id] * (P - n) + list(p) for n, p in zip(lens, prompts)], dtype=torch.long, device=device)
    pad = torch.tensor([P - n for n in lens], dtype=torch.long, device=device)
    if hasattr(runner, "steps"):
        yield from runner.steps(tokens, pad, budget, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                chunked=True)
        return
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    with torch.inference_mode():
        logits = runner.start(tokens, pad, P + budget)
        for n in range(budget):
            nxt = sample(logits, temperature, top_p, top_k, gen)
            yield [nxt.tolist()]
            if n + 1 < budget:
                logits = runner.next(nxt)


class IncrementalText:
    """The text of a growing list of token ids, decoded a few tokens at a time (vLLM's
    `detokenize_incrementally`): each `add` decodes the tokens since the last emitted piece plus the
    ones before it (for a tokenizer's leading-space rules), not the whole row, so a row costs time
    linear in its length.

    Example:
        >>> t = IncrementalText(lambda ids: "".join(chr(96 + i) for i in ids))
        >>> t.add([1, 2]), t.add([3]), t.text
        ('ab', 'c', 'abc')
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[prefix:read] were decoded already; read: end of the emitted text

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text they complete ('' while a character is still partial)."""
        self.ids += tokens
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            piece = now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""


class RowText:
    """The text of one generated row as its tokens arrive: EOS, length and stop strings end it, and
    `add` returns only text that is final.

    A piece is final when it has no trailing partial UTF-8 character, no trailing space (a tokenizer
    may still merge it) and nothing that could be the start of a stop string. Text is decoded
    incrementally (`IncrementalText`) while the row runs, and once whole (`decode(ids)`, mlx-lm's
    text) when it ends, cut before the earliest stop string; the pieces concatenate to it.

    Example:
        >>> r = RowText(lambda ids: "".join(chr(96 + i) for i in ids), eos={0}, stop=["cd"], limit=10)
        >>> r.add([1, 2]), r.add([3]), r.add([4, 5]), r.reason, r.ids
        ('ab', '', '', 'stop', [1, 2, 3, 4])
    """

    def __init__(self, decode, eos: set[int], stop: list[str] | None, limit: int, pieces: bool = True):
        self._decode, self._eos, self._stop, self._limit = decode, eos, stop, limit
        self._pieces = pieces  # False: nobody reads pieces, decode only to look for stop strings
        self._inc = IncrementalText(decode)
        self._longest = max((len(x) for x in stop or ()), default=0)
        self.ids: list[int] = []
        self.reason: str | None = None  # "stop" | "length" | "cancelled" once the row has ended
        self.text: str | None = None  # the whole text, once ended
        self._emitted = ""

    def add(self, tokens: list[int]) -> str:
        """Take the row's next tokens (one step's or several); return the new final text ('' if none).
        When they end the row, the rest of its text is returned; after that, tokens are ignored."""
        if self.reason is not None:
            return ""
        n0 = len(self.ids)
        for t in tokens:
            if t in self._eos:
                self.reason = "stop"
                break
            self.ids.append(t)
            if len(self.ids) >= self._limit:
                self.reason = "length"
                break
        if not self._pieces and not self._stop:
            return self._finish(self._decode(self.ids)) if self.reason is not None else ""
        seen = len(self._inc.text)
        self._inc.add(self.ids[n0:])
        if self._stop and find_stop(self._inc.text[max(0, seen - self._longest):], self._stop) is not None:
            for k in range(n0 + 1, len(self.ids) + 1):  # keep the tokens up to the stop string's end
                head = self._decode(self.ids[:k])
                if find_stop(head, self._stop) is not None:
                    self.ids = self.ids[:k]
                    break
            self.reason = "stop"
        if self.reason is not None:
            final = self._decode(self.ids)
            cut = find_stop(final, self._stop)
            return self._finish(final if cut is None else final[:cut])
        text = self._inc.text
        safe = text[: len(text) - holdback(text, self._stop)].rstrip(" ")
        if len(safe) > len(self._emitted) and safe.startswith(self._emitted):
            piece, self._emitted = safe[len(self._emitted):], safe
            return piece
        return ""

    def close(self, reason: str = "length") -> str:
        """End the row (its tokens ran out, or the consumer went away); the rest of its text."""
        if self.reason is not None:
            return ""
        self.reason = reason
        return self._finish(self._decode(self.ids))

    def _finish(self, final: str) -> str:
        self.text = final
        return final[len(self._emitted):] if final.startswith(self._emitted) else ""

    def completion(self, prompt_tokens: int) -> Completion:
        reason = "length" if self.reason in (None, "cancelled") else self.reason
        return Completion(self.text if self.text is not None else self._decode(self.ids), self.ids, prompt_tokens, reason)


class TextStream:
    """Iterator of text pieces for one prompt; `.last_completion` is set once it is exhausted.

    `chunks` yields lists of steps (`token_chunks`); the pieces are `RowText`'s and concatenate to
    `last_completion.text`.
    """

    def __init__(self, chunks: Iterator[list[list[int]]], decode, eos: set[int], stop: list[str] | None,
                 prompt_tokens: int, budget: int, on_done=None):
        self._chunks, self._row = chunks, RowText(decode, eos, stop, budget)
        self._prompt_tokens, self._on_done = prompt_tokens, on_done
        self.last_completion: Completion | None = None
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _run(self) -> Iterator[str]:
        row = self._row
        try:
            for chunk in self._chunks:
                piece = row.add([step[0] for step in chunk])
                if piece:
                    yield piece
                if row.reason is not None:
                    break
            piece = row.close()
            if piece:
                yield piece
            self.last_completion = row.completion(self._prompt_tokens)
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
            if self._on_done is not None:
                self._on_done(self.last_completion)
