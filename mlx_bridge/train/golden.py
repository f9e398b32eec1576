"""Golden probes: what the trained MLX model computes for a few fixed token sequences, saved at save time.

The probe sequences are the first `length` tokens of the first `num` examples of the validation split
(train when there is none), all cut to the same length so no padding is involved. For each the MLX
logits at every position and a greedy continuation of `max_new_tokens` (recomputed from scratch each
token, no KV cache, no EOS stop) are stored with `mlx_bridge.probes.Probes`.

Short probes cannot see a sliding window or a rope scaling that starts past a threshold, which is where
configs go wrong. When the model has either, one long probe (the probe tokens repeated) runs
`LONG_TAIL` positions past the farthest of them, and the logits of its last `LONG_TAIL` positions are
kept (cheap: one forward pass, a few rows of logits).

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
LONG_TAIL = 8  # positions of the long probe past its threshold whose logits are kept


def long_probe_length(args) -> int | None:
    """Length of a probe that reaches `LONG_TAIL` positions past the sliding window and past the
    rope-scaling threshold (longrope's original context, dynamic NTK's context), from the model's
    args (mlx-lm ModelArgs or a config dict); None when the model has neither.

    Example:
        >>> long_probe_length({"sliding_window": 4096}), long_probe_length({"sliding_window": None})
        (4104, None)
        >>> long_probe_length({"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 4096}})
        4104
    """
    get = args.get if isinstance(args, dict) else (lambda k: getattr(args, k, None))
    marks = [get("sliding_window")]
    rs = get("rope_scaling") or get("rope_parameters") or {}
    kind = (rs.get("rope_type") or rs.get("type")) if isinstance(rs, dict) else None
    if kind in ("longrope", "su"):
        marks.append(rs.get("original_max_position_embeddings") or get("original_max_position_embeddings"))
    elif kind == "dynamic":
        marks.append(get("max_position_embeddings"))
    marks = [m for m in marks if isinstance(m, int) and not isinstance(m, bool) and m > 0]
    return max(marks) + LONG_TAIL if marks else None


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
    probes = Probes(np.asarray(ids, np.int32), np.array(logits), np.array(seq[:, ids.shape[1]:]), prompts, dtype)
    L = long_probe_length(getattr(model, "args", {}))
    if L is not None:
        probes.long_input_ids = np.resize(np.asarray(ids, np.int32).reshape(-1), L)[None]  # [1, L]
        was_training = model.training
        model.eval()
        try:
            tail = model(mx.array(probes.long_input_ids))[:, -LONG_TAIL:].astype(mx.float32)  # [1, K, V]
            mx.eval(tail)
        finally:
            model.train(was_training)
        probes.long_logits = np.array(tail)
    return probes
