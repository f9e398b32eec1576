"""Token sampling with mlx-lm's semantics (`mlx_lm.sample_utils.make_sampler`), in PyTorch.

temperature 0 is argmax. Otherwise the filters act on log-probabilities before the temperature, in
mlx-lm's order: top-p (keep the smallest set of tokens whose mass reaches top_p), then top-k; the
token is drawn from softmax(logprobs / temperature). A `torch.Generator` makes a seeded run repeatable.

Example:
    >>> import torch
    >>> sample(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0.0).tolist()
    [1]
"""

from __future__ import annotations

import torch

from ..errors import BridgeError


def check_sampling(max_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise a BridgeError naming the first out-of-range sampling setting."""
    problems = []
    if not isinstance(max_tokens, int) or max_tokens < 1:
        problems.append(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        problems.append(f"temperature must be >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        problems.append(f"top_k must be an integer >= 0, got {top_k!r}")
    if problems:
        raise BridgeError("sampling: " + "; ".join(problems))


def apply_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (-inf) the least likely tokens outside the top-p mass (mlx-lm `apply_top_p`)."""
    s, _ = logprobs.sort(dim=-1)  # ascending
    p = s.float().exp()
    above = p.flip(-1).cumsum(-1).flip(-1) - p  # mass strictly above each sorted entry
    total = above[..., :1] + p[..., :1]
    dropped = (above >= top_p * total).sum(-1, keepdim=True)
    threshold = s.gather(-1, dropped.clamp(max=s.shape[-1] - 1))
    return logprobs.masked_fill(logprobs < threshold, float("-inf"))


def apply_top_k(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k most likely tokens (mlx-lm `apply_top_k`)."""
    if top_k >= logprobs.shape[-1]:
        return logprobs
    kth = logprobs.topk(top_k, dim=-1).values[..., -1:]
    return logprobs.masked_fill(logprobs < kth, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logprobs = logits.float().log_softmax(dim=-1)
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if top_k > 0:
        logprobs = apply_top_k(logprobs, top_k)
    probs = torch.softmax(logprobs / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
