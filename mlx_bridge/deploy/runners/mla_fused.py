"""deepseek_v3's latent attention on the fast path: the fused weights of one `MLAttention` and its decoder
layer as a pure function (the same signature as `fused.make_layer`'s, so `FastRunner` compiles and captures
it like any other layer).

Per layer the query and latent projections share one matrix (`[q_a_proj; kv_a_proj_with_mqa]`, or
`[q_proj; kv_a_proj_with_mqa]`), rebound as views (Hugging Face names kept). The cache holds latent rows
`[normed latent; rotated key]` (mla.py); a decode step attends over them with `kv_b_proj`'s key part folded
into the query and its value part applied after (one key head: the Triton decode kernel or SDPA), prefill
with transformers' expanded keys and values over its own rows.

Example:
    >>> layer = make_mla_layer(spec, decode=True)                                   # doctest: +SKIP
    >>> x = layer(x, w, kc, vc, cos, sin, mask, slot)   # x (B, 1, D), kc (B, 1, S, r + rope)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..native.layers import attend
from ..native.layers import norm as rms
from ..native.mla import LATENT_EPS, MLAttention, rope_pairs
from ..native.rope import apply_rope


def mla_weights(at: MLAttention) -> tuple:
    """Slots 4-10 of a fused layer's weights: ([q_a; kv_a] or [q; kv_a], its bias, o_proj weight and bias,
    q_a_layernorm (None without q_lora_rank), kv_a_layernorm, (q_b_proj or None, kv_b_proj))."""
    from .fused import NotFusable, _fuse_rows

    first = at.q_a_proj if at.lora else at.q_proj
    if (first.bias is None) != (at.kv_a_proj_with_mqa.bias is None):
        raise NotFusable("deepseek_v3 with attention_bias and no q_lora_rank (q_proj has no bias)")
    wa, ba = _fuse_rows([first, at.kv_a_proj_with_mqa])
    return (wa, ba, at.o_proj.weight, at.o_proj.bias, at.q_a_layernorm.weight if at.lora else None,
            at.kv_a_layernorm.weight, (at.q_b_proj.weight if at.lora else None, at.kv_b_proj.weight))


def make_mla_layer(spec, decode: bool) -> Callable:
    """layer(x, w, kc, vc, cos, sin, mask, slots) -> x for `spec.mla` = (kv_lora_rank, qk_nope_head_dim,
    qk_rope_head_dim, v_head_dim, q_lora_rank, rope_interleave); kc (B, 1, S, r + rope) takes the latent
    rows at `slots`, vc is the empty value cache (unused); kc None: no cache."""
    from .fused import _decode_attend, chain, make_out

    r, nope, rope, vd, qlora, interleave = spec.mla
    nh, eps, scale = spec.nh, spec.eps, spec.scale
    rot = rope_pairs if interleave else apply_rope
    out = make_out(spec)

    def layer(x, w, kc, vc, cos, sin, mask, slots, h=None, nxt=None):
        ln1, wa, ba, qn, kvn, (wqb, wkvb) = w[0], w[4], w[5], w[8], w[9], w[10]
        B, L, _ = x.shape  # x: [B, L, D]
        h = F.linear(rms(x, ln1, eps, False) if h is None else h, wa, ba)
        if qlora:
            qa, c, k_rot = h.split([qlora, r, rope], dim=-1)
            q = F.linear(rms(qa, qn, LATENT_EPS, False), wqb)
        else:
            q, c, k_rot = h.split([nh * (nope + rope), r, rope], dim=-1)
        q_pass, q_rot = q.view(B, L, nh, -1).transpose(1, 2).split([nope, rope], dim=-1)  # [B, H, L, *]
        q_rot, k_rot = rot(q_rot, cos, sin), rot(k_rot[:, None], cos, sin)
        lat = torch.cat((rms(c, kvn, LATENT_EPS, False)[:, None], k_rot), dim=-1)  # [B, 1, L, r + rope]
        if kc is not None:
            kc.index_copy_(2, slots, lat)
        wkv = wkvb.view(nh, nope + vd, r)
        if decode:  # absorbed: one key head, the latent rows its keys and (their first r dims) its values
            qa = torch.cat((q_pass @ wkv[:, :nope], q_rot), dim=-1)  # [B, H, 1, r + rope]
            o = _decode_attend(qa, kc, kc, mask, scale, None)[..., :r] @ wkv[:, nope:].transpose(1, 2)
        else:  # expanded over this step's own rows
            kv = F.linear(lat[:, 0, :, :r], wkvb).view(B, L, nh, -1).transpose(1, 2)  # [B, H, L, nope + v]
            k_nope, v = kv.split([nope, vd], dim=-1)
            k = torch.cat((k_nope, lat[..., r:].expand(B, nh, L, rope)), dim=-1)
            o = attend(torch.cat((q_pass, q_rot), dim=-1), k, v, mask, scale, None)  # [B, H, L, v]
        return chain(out(x, o, w), nxt, spec)

    return layer
