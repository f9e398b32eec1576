"""Multi-head latent attention (deepseek_v3's `DeepseekV3Attention`) for the native model class.

Queries come from a low-rank projection (`q_a_proj`, `q_a_layernorm`, `q_b_proj`; or one `q_proj`),
keys and values from one shared latent: `kv_a_proj_with_mqa` gives the latent (kv_lora_rank) and one
rotary key (qk_rope_head_dim) shared by every head; `kv_b_proj` expands the normed latent into each
head's non-rotary key (qk_nope_head_dim) and value (v_head_dim). As in transformers, the cache holds
the latent, not the expanded keys: one (B, 1, S, kv_lora_rank + qk_rope_head_dim) row per position,
`[normed latent; rotated key]` (the value cache is empty).

Two ways to attend, the same sums in another order:
    expanded  (prefill, no cache) transformers' own: `kv_b_proj` over every cached latent, then
              attention over per-head keys (B, H, S, nope + rope) and values (B, H, S, v)
    absorbed  (one token a row over the cache: decode) `kv_b_proj`'s key part folded into the query
              and its value part applied after: attention over the latent itself, one key head (mlx-lm's
              decode), so a step reads the cache once and no expanded keys are built

Rope (`rope_interleave`, transformers' default): the rotary dims are pairs (x0, x1), (x2, x3), ...;
`apply_rotary_pos_emb_interleave` rotates them and writes evens then odds, for queries and keys alike.

Example:
    >>> import torch
    >>> from mlx_bridge.deploy.native.config import ModelArgs, RopeArgs
    >>> a = ModelArgs("deepseek_v3", 32, 16, 32, 1, 2, 2, 4, windows=[None], ropes=[RopeArgs(dim=4)],
    ...               kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)
    >>> MLAttention(a).kv_b_proj.weight.shape
    torch.Size([20, 8])
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelArgs
from .layers import RMSNorm, attend
from .rope import apply_rope

LATENT_EPS = 1e-6  # `DeepseekV3RMSNorm`'s default: q_a_layernorm and kv_a_layernorm take no eps from the config


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_pos_emb_interleave` for one tensor x (B, H, L, d): pairs (x0, x1), ... rotated,
    written evens then odds; cos/sin (B, 1, L, d) are `cat(freqs, freqs)`."""
    c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class MLAttention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        H, D = a.num_heads, a.hidden_size
        self.nh, self.r, self.vd = H, a.kv_lora_rank, a.v_head_dim
        self.nope, self.rope = a.qk_nope_head_dim, a.qk_rope_head_dim
        qk = self.nope + self.rope
        self.lora = bool(a.q_lora_rank)
        if self.lora:
            self.q_a_proj = nn.Linear(D, a.q_lora_rank, bias=a.qkv_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, LATENT_EPS)
            self.q_b_proj = nn.Linear(a.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.r + self.rope, bias=a.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_EPS)
        self.kv_b_proj = nn.Linear(self.r, H * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(H * self.vd, D, bias=a.o_bias)
        self.scale = a.attn_scale or qk ** -0.5
        self.interleave = a.rope_interleave

    def _rope(self, x, cos, sin):
        return rope_pairs(x, cos, sin) if self.interleave else apply_rope(x, cos, sin)

    def forward(self, x, cos, sin, mask, cache: tuple | None = None, slots=None, kv_len: int | None = None):
        B, L, _ = x.shape  # x: [B, L, D]
        H, nope, r = self.nh, self.nope, self.r
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.lora else self.q_proj(x)
        q_pass, q_rot = q.view(B, L, H, -1).transpose(1, 2).split([nope, self.rope], dim=-1)  # [B, H, L, *]
        c, k_rot = self.kv_a_proj_with_mqa(x).split([r, self.rope], dim=-1)
        q_rot, k_rot = self._rope(q_rot, cos, sin), self._rope(k_rot[:, None], cos, sin)
        lat = torch.cat((self.kv_a_layernorm(c)[:, None], k_rot), dim=-1)  # [B, 1, L, r + rope]
        if cache is not None:  # the latent rows written at their slots; attend over the cache
            kc = cache[0]
            kc.index_copy_(2, slots, lat)
            lat = kc if kv_len is None else kc[:, :, :kv_len]
        w = self.kv_b_proj.weight.view(H, nope + self.vd, r)
        if cache is not None and L == 1:  # absorbed: q_nope W_k over the latent, W_v after
            qa = torch.cat((q_pass @ w[:, :nope], q_rot), dim=-1)  # [B, H, 1, r + rope]
            o = attend(qa, lat, lat[..., :r], mask, self.scale, None) @ w[:, nope:].transpose(1, 2)  # [B, H, 1, v]
        else:  # expanded: per-head keys and values from every latent row
            S = lat.shape[2]
            kv = self.kv_b_proj(lat[:, 0, :, :r]).view(B, S, H, -1).transpose(1, 2)  # [B, H, S, nope + v]
            k_nope, v = kv.split([nope, self.vd], dim=-1)
            k = torch.cat((k_nope, lat[..., r:].expand(B, H, S, self.rope)), dim=-1)
            o = attend(torch.cat((q_pass, q_rot), dim=-1), k, v, mask, self.scale, None)  # [B, H, L, v]
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))
