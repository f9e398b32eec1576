"""Greedy exact-match evaluation of the demo task, in MLX (mlx-lm) and in PyTorch (`DeployedModel`).

Both sides get the same chat-formatted prompts and decode greedily until an end-of-sequence token or
`max_tokens`; the generated token ids are kept so the two sides can be compared token for token.

Example:
    >>> from mlx_lm import load as mlx_load                                     # doctest: +SKIP
    >>> model, tok = mlx_load("mlx_bridge/demo/assets/base")                    # doctest: +SKIP
    >>> ev = evaluate_mlx(model, tok, make_splits()["test"][:10])               # doctest: +SKIP
    >>> ev.accuracy                                                             # doctest: +SKIP
    0.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .task import MAX_LEN, exact_match

MAX_TOKENS = MAX_LEN + 2  # the longest answer, its end token, and one token of slack


@dataclass
class Evaluation:
    """Predictions of one model on a list of records."""

    side: str  # "mlx" | "pytorch"
    texts: list[str]
    token_ids: list[list[int]]
    accuracy: float
    seconds: float
    prompt_ids: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict:
        return {"side": self.side, "accuracy": self.accuracy, "n": len(self.texts), "seconds": round(self.seconds, 3),
                "examples": [{"prompt_ids": p, "text": t} for p, t in zip(self.prompt_ids[:3], self.texts[:3])]}


def user_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) the assistant's answer."""
    return [m for m in record["messages"] if m["role"] != "assistant"]


def evaluate_mlx(model, tokenizer, records: list[dict], max_tokens: int = MAX_TOKENS) -> Evaluation:
    """Greedy `mlx_lm.stream_generate` on each record's chat prompt; exact match against its answer.

    `tokenizer` is mlx-lm's `TokenizerWrapper` (as `mlx_lm.load` returns it). Prompts are tokenized as
    `mlx_lm.generate` does for chat: the chat template with the generation prompt, no extra special tokens.
    """
    from mlx_lm import stream_generate

    t0 = time.perf_counter()
    prompts, texts, ids = [], [], []
    for r in records:
        text = tokenizer.apply_chat_template(user_messages(r), tokenize=False, add_generation_prompt=True)
        p = tokenizer.encode(text, add_special_tokens=False)
        out, toks = "", []
        for resp in stream_generate(model, tokenizer, p, max_tokens=max_tokens):  # argmax sampler by default
            out += resp.text
            if resp.finish_reason != "stop":  # the final "stop" response carries the EOS token itself
                toks.append(int(resp.token))
        prompts.append(list(p))
        texts.append(out)
        ids.append(toks)
    return Evaluation("mlx", texts, ids, exact_match(texts, records), time.perf_counter() - t0, prompts)


def evaluate_torch(model, records: list[dict], max_tokens: int = MAX_TOKENS, batch_size: int = 64) -> Evaluation:
    """Greedy generation with a `DeployedModel` (`mlx_bridge.load`), batched; exact match against the answers."""
    t0 = time.perf_counter()
    prompts = [model.encode_prompt(messages=user_messages(r)) for r in records]
    texts, ids = [], []
    for i in range(0, len(prompts), batch_size):
        for c in model.complete(prompts[i:i + batch_size], max_tokens=max_tokens, temperature=0.0):
            texts.append(c.text)
            ids.append(list(c.token_ids))
    return Evaluation("pytorch", texts, ids, exact_match(texts, records), time.perf_counter() - t0, prompts)


def agreement(a: Evaluation, b: Evaluation) -> dict:
    """How far two evaluations of the same records agree: identical prompts and generated token ids.

    Example:
        >>> e = Evaluation("mlx", ["a"], [[5]], 1.0, 0.1, [[1, 2]])
        >>> agreement(e, e)["same_tokens"]
        1
    """
    n = len(a.token_ids)
    if n != len(b.token_ids):
        raise ValueError(f"{n} predictions against {len(b.token_ids)}")
    same_prompts = sum(x == y for x, y in zip(a.prompt_ids, b.prompt_ids))
    same = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    return {"n": n, "same_prompts": same_prompts, "same_tokens": same, "rate": same / max(n, 1),
            "differ": [i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y][:10]}
