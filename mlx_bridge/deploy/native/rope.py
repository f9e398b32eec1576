"""Rotary position embeddings: inverse frequencies per `rope_type`, and their application.

Pure functions of the numbers in `rope_parameters`, written to compute what transformers computes
(`modeling_rope_utils`): same formulas, float32, cos/sin cast to the activation dtype before use.

Example:
    >>> import torch
    >>> inv, scale = inv_freq(RopeArgs("default", 10000.0, 8))
    >>> inv.shape, scale
    (torch.Size([4]), 1.0)
"""

from __future__ import annotations

import math

import torch

from .config import RopeArgs


def _default(r: RopeArgs) -> tuple[torch.Tensor, float]:
    return 1.0 / (r.theta ** (torch.arange(0, r.dim, 2, dtype=torch.int64).float() / r.dim)), 1.0


def _linear(r: RopeArgs) -> tuple[torch.Tensor, float]:
    inv, _ = _default(r)
    return inv / r.params["factor"], 1.0


def _llama3(r: RopeArgs) -> tuple[torch.Tensor, float]:
    inv, _ = _default(r)
    p = r.params
    factor, low, high, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l), 1.0


def _yarn(r: RopeArgs) -> tuple[torch.Tensor, float]:
    p, dim, base = r.params, r.dim, r.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or r.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = float(mscale(factor, ms) / mscale(factor, ms_all)) if ms and ms_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp  # share of the extrapolated (unscaled) frequency
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, attn


def _phimoe_longrope(r: RopeArgs) -> tuple[torch.Tensor, tuple]:
    """`PhimoeRotaryEmbedding.forward`: the frequencies of `_compute_longrope_parameters` called without a
    length (short factors, always), cos/sin scaled by `long_mscale` when the step's last position + 1
    passes `original_max_position_embeddings`, else `short_mscale` (a scale tuple, chosen in `cos_sin`
    per row: transformers takes the max over the batch, the same for unpadded or single rows).
    mlx-lm's phimoe (`SuScaledRoPE`) uses the long factors and `long_mscale` at every length instead."""
    p = r.params
    shape = torch.arange(0, r.dim, 2, dtype=torch.int64).float() / r.dim
    inv = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * r.theta ** shape)
    return inv, (float(p["short_mscale"]), float(p["long_mscale"]), int(p["original_max_position_embeddings"]))


INV_FREQ = {"default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn,
            "phimoe_longrope": _phimoe_longrope}


def inv_freq(r: RopeArgs) -> tuple[torch.Tensor, float | tuple]:
    """(inverse frequencies (dim/2,) float32, cos/sin scaling) for one layer's rope settings; the scaling
    is (short, long, threshold) where it depends on the step's positions (phimoe)."""
    return INV_FREQ[r.rope_type](r)


def cos_sin(inv: torch.Tensor, scale: float | tuple, pos: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, 1, L, dim) for positions `pos` (B, L), in `dtype` (as transformers casts them)."""
    freqs = pos[..., None].float() * inv.float()  # [B, L, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    if isinstance(scale, tuple):  # phimoe: long_mscale once a row's last position + 1 passes the threshold (on
        short, long, threshold = scale  # the device, no sync; per row, where transformers takes the batch's max)
        scale = torch.where(pos.amax(-1, keepdim=True)[..., None] + 1 > threshold, long, short)  # [B, 1, 1]
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, L, D); the rest pass through (partial rotary)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
