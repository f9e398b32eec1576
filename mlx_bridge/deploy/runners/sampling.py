"""On-device token choice for the fast decode loop: per-row temperature, top-p, top-k and seed.

Everything is a tensor op with static shapes, so it runs inside a captured CUDA graph and never
syncs with the host. The filters are `sampling.py`'s (mlx-lm semantics: top-p first, then top-k, both
on log-probabilities); the draw is the Gumbel-max trick on counter-based noise (a 32-bit integer
hash of seed, row, step and vocabulary index), so a seed gives the same tokens on CPU and GPU, with
or without a graph. Same distribution as `sampling.sample`, not the same random stream.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 3.0, 1.0]])
    >>> one = torch.ones(1)
    >>> pick(logits, one * 0, one, one.long() * 0, one.long(), torch.zeros(1, dtype=torch.long)).tolist()
    [1]
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x < 2**32, with no int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Noise (B, V) float32 in (0, 1) from per-row seeds (B,) int64 and a step counter (1,) or (B,)
    int64. `rows` (B,) tells rows with one seed apart (default: their index in the batch; continuous
    batching passes each row's own number, so that a row draws the same wherever it sits)."""
    if rows is None:
        rows = torch.arange(seed.shape[0], device=seed.device)
    h = _mix(_mix(_mix(seed & M32) ^ rows) ^ (counter & M32))  # [B]
    u = _mix(h[:, None] ^ torch.arange(vocab, device=seed.device)[None])  # [B, V]
    return ((u >> 8).float() + 0.5) * (2.0 ** -24)


def filtered_logprobs(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, V) float32 with what top-p (B,) and top-k (B,) drop set to -inf.

    top_p >= 1 keeps everything, top_k == 0 too (as `sampling.apply_top_p` / `apply_top_k`).
    """
    V = logits.shape[-1]
    lp = logits.float().log_softmax(dim=-1)
    s, _ = lp.sort(dim=-1, descending=True)
    p = s.exp()
    before = p.cumsum(dim=-1) - p  # mass strictly above each sorted entry
    kept = (before < top_p[:, None] * p.sum(dim=-1, keepdim=True)).sum(dim=-1, keepdim=True)
    kept = torch.where(top_p[:, None] >= 1, V, kept).clamp(1, V)
    k = torch.where(top_k > 0, top_k, V).clamp(1, V)[:, None]
    thr = torch.maximum(s.gather(-1, kept - 1), s.gather(-1, k - 1))  # smallest value both filters keep
    return lp.masked_fill(lp < thr, float("-inf"))


def pick(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
         seed: torch.Tensor, counter: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax where temperature is 0, else a filtered draw
    (`uniform` says what `counter` and `rows` are)."""
    lp = filtered_logprobs(logits, top_p, top_k)
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]
    g = -torch.log(-torch.log(uniform(seed, counter, logits.shape[-1], rows)))
    drawn = (lp / t + g).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Next token ids (B,): the argmax (first index on ties, as `sampling.sample` with temperature 0)."""
    return logits.argmax(dim=-1)
