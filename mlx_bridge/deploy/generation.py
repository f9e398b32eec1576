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
    lens = [len(p) for p in prompts]
    P = max(lens)
    tokens = torch.tensor([[pad_id] * (P - n) + list(p) for n, p in zip(lens, prompts)], dtype=torch.long, device=device)
    pad = torch.tensor([P - n for n in lens], dtype=torch.long, device=device)
    if hasattr(runner, "steps"):
        yield from runner.steps(tokens, pad, budget, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        return
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    with torch.inference_mode():
        logits = runner.start(tokens, pad, P + budget)
        for n in range(budget):
            nxt = sample(logits, temperature, top_p, top_k, gen)
            yield nxt.tolist()
            if n + 1 < budget:
                logits = runner.next(nxt)


class TextStream:
    """Iterator of text pieces for one prompt; `.last_completion` is set once it is exhausted.

    A piece is emitted only when it is final: no trailing partial UTF-8 character, no trailing
    space (a tokenizer may still merge it), nothing that could be the start of a stop string. The
    pieces concatenate to `last_completion.text`.
    """

    def __init__(self, steps: Iterator[list[int]], decode, eos: set[int], stop: list[str] | None,
                 prompt_tokens: int, budget: int, on_done=None):
        self._steps, self._decode, self._eos, self._stop = steps, decode, eos, stop
        self._prompt_tokens, self._budget, self._on_done = prompt_tokens, budget, on_done
        self.last_completion: Completion | None = None
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _run(self) -> Iterator[str]:
        ids: list[int] = []
        emitted, reason = "", "length"
        try:
            for (t,) in self._steps:
                if t in self._eos:
                    reason = "stop"
                    break
                ids.append(t)
                text = self._decode(ids)
                cut = find_stop(text, self._stop)
                if cut is not None:
                    reason = "stop"
                    break
                if text.endswith("\ufffd"):
                    continue
                safe = text[: len(text) - holdback(text, self._stop)].rstrip(" ")
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    piece, emitted = safe[len(emitted):], safe
                    yield piece
            text = self._decode(ids)
            cut = find_stop(text, self._stop)
            final = text if cut is None else text[:cut]
            if final.startswith(emitted) and len(final) > len(emitted):
                yield final[len(emitted):]
            self.last_completion = Completion(final, ids, self._prompt_tokens, reason)
        finally:
            close = getattr(self._steps, "close", None)
            if close is not None:
                close()
            if self._on_done is not None:
                self._on_done(self.last_completion)
