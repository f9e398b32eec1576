"""Golden probes: what the trained MLX model computes for a few fixed token sequences, saved at save time.

The probe sequences are the first `length` tokens of the first `num` examples of the validation split
(train when there is none), all cut to the same length so no padding is involved. For each the MLX
logits at every position and a greedy continuation of `max_new_tokens` (recomputed from scratch each
token, no KV cache, no EOS stop) are stored with `mlx_bridge.probes.Probes`.

Example:
    >>> ids = probe_ids(examples)  # doctest: +SKIP
    >>> compute_probes(model, ids, tokenizer).logits.shape  # doctest: +SKIP
    (4, 16, 101)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..probes import Probes
from .templates import Example

NUM_PROBES = 4
PROBE_LENGTH = 16
MAX_NEW_TOKENS = 8


def probe_ids(examples: list[Example], num: int = NUM_PROBES, length: int = PROBE_LENGTH) -> np.ndarray:
    """(N, L) int32: the first L tokens of the first N examples with at least 2 tokens."""
    chosen = [e.tokens for e in examples if len(e.tokens) >= 2][:num]
    L = min([length] + [len(t) for t in chosen])
    return np.stack([t[:L] for t in chosen]).astype(np.int32)


def compute_probes(model: nn.Module, ids: np.ndarray, tokenizer=None, dtype: str = "float32",
                   max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> Probes:
    """Run the probes through `model` in eval mode (dropout off); the mode is restored afterwards.
    `progress` shows a bar over the forward passes when they take more than a couple of seconds."""
    from .log import phase

    was_training = model.training
    model.eval()
    try:
        x = mx.array(ids)
        logits = model(x).astype(mx.float32)  # [N, L, V]
        mx.eval(logits)
        seq = x
        for _ in phase(range(max_new_tokens), f"probes ({ids.shape[0]} x {ids.shape[1]} tokens, greedy)",
                       quiet=not progress):
            nxt = mx.argmax(model(seq)[:, -1, :], axis=-1).astype(mx.int32)  # [N]
            seq = mx.concatenate([seq, nxt[:, None]], axis=1)
            mx.eval(seq)
        mx.eval(logits, seq)
    finally:
        model.train(was_training)
    prompts = [tokenizer.decode(row.tolist()) for row in ids] if tokenizer is not None else []
    return Probes(np.asarray(ids, np.int32), np.array(logits), np.array(seq[:, ids.shape[1]:]), prompts, dtype)
