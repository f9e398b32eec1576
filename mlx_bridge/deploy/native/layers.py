"""Building blocks of the native model classes: norms, attention, MLPs, the static KV cache (MoE: moe.py).

Parameter names are Hugging Face's, so `Transformer.load_state_dict` takes an export's tensors as
they are. Numerics follow transformers: norms in float32, rope cos/sin in the activation dtype,
softmax in float32, MoE routing weights in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .moe import MIXTRAL_NAMED, SparseMoe
from .rope import apply_rope

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm with float32 statistics, as transformers computes it (the module and the fused path)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:  # (x * (1 + w)) in float32, then cast (transformers Gemma*RMSNorm)
        return (n * (1.0 + w.float())).type_as(x)
    return w * n.to(x.dtype)


def norm(x: torch.Tensor, w, eps: float, gemma: bool = False) -> torch.Tensor:
    """`rms_norm` with weight w, or LayerNorm (`nn.LayerNorm`'s own kernel) when w is (weight, bias)."""
    if isinstance(w, tuple):
        return F.layer_norm(x, x.shape[-1:], w[0], w[1], eps)
    return rms_norm(x, w, eps, gemma)


def make_norm(a: ModelArgs, gemma: bool | None = None) -> nn.Module:
    """The model's norm over hidden_size: LayerNorm with bias (phimoe) or RMSNorm."""
    if a.layer_norm:
        return nn.LayerNorm(a.hidden_size, eps=a.rms_norm_eps)
    return RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma if gemma is None else gemma)


def norm_weights(m: nn.Module):
    """What `norm` takes for module m: its weight, or (weight, bias) for a LayerNorm."""
    return (m.weight, m.bias) if isinstance(m, nn.LayerNorm) else m.weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)


def cache_shapes(a: ModelArgs, batch: int, max_len: int) -> tuple[tuple, tuple]:
    """(key, value) cache shapes of one layer: (B, H_kv, S, head_dim) each; deepseek_v3's latent rows
    (B, 1, S, kv_lora_rank + qk_rope_head_dim) and an empty value cache (mla.py)."""
    if a.kv_lora_rank:
        return (batch, 1, max_len, a.kv_lora_rank + a.qk_rope_head_dim), (batch, 1, max_len, 0)
    shape = (batch, a.num_kv_heads, max_len, a.head_dim)
    return shape, shape


@dataclass
class KVCache:
    """Pre-allocated keys and values, one (B, H_kv, max_len, D) pair per layer; written at slots."""

    k: list
    v: list

    @classmethod
    def allocate(cls, a: ModelArgs, batch: int, max_len: int, device, dtype) -> "KVCache":
        ks, vs = cache_shapes(a, batch, max_len)
        return cls([torch.zeros(ks, device=device, dtype=dtype) for _ in range(a.num_layers)],
                   [torch.zeros(vs, device=device, dtype=dtype) for _ in range(a.num_layers)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def attend(q, k, v, mask, scale: float, softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, L, D) over k, v (B, H_kv, S, D); mask (B|1, 1, L, S) bool (or additive) or
    None (causal); `sinks` (H,): gpt_oss's per-head sink logit, a softmax column whose value is dropped."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    rep = q.shape[1] // k.shape[1]  # SDPA has neither: the eager path, as transformers runs Gemma-2 / gpt-oss
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, L, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
    if sinks is not None:  # `eager_attention_forward` of gpt_oss: softmax in the activation dtype
        B, H, L, _ = s.shape
        s = torch.cat([s, sinks.reshape(1, H, 1, 1).expand(B, H, L, 1).to(s.dtype)], dim=-1)
        s = s - s.max(dim=-1, keepdim=True).values
        return torch.matmul(F.softmax(s, dim=-1, dtype=s.dtype)[..., :-1].to(v.dtype), v)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.nh, self.nkv, self.hd = a.num_heads, a.num_kv_heads, a.head_dim
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.fused = a.fused_qkv
        if a.fused_qkv:
            self.qkv_proj = nn.Linear(a.hidden_size, q + 2 * kv, bias=a.qkv_bias)
        else:
            self.q_proj = nn.Linear(a.hidden_size, q, bias=a.qkv_bias)
            self.k_proj = nn.Linear(a.hidden_size, kv, bias=a.qkv_bias)
            self.v_proj = nn.Linear(a.hidden_size, kv, bias=a.qkv_bias)
        self.o_proj = nn.Linear(q, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.gemma)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.gemma)
        if a.qk_norm_full:  # olmoe: over all heads' q (H * hd) and k (H_kv * hd)
            self.q_norm = RMSNorm(q, a.rms_norm_eps)
            self.k_norm = RMSNorm(kv, a.rms_norm_eps)
        self.qk_norm, self.qk_norm_full, self.clip = a.qk_norm, a.qk_norm_full, a.clip_qkv
        self.scale = a.attn_scale or a.head_dim ** -0.5
        self.softcap = a.attn_softcap
        if a.sinks:
            self.sinks = nn.Parameter(torch.zeros(a.num_heads))

    def forward(self, x, cos, sin, mask, cache: tuple | None = None, slots=None, kv_len: int | None = None):
        B, L, _ = x.shape  # x: [B, L, D]
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.view(B, L, -1, self.hd), k.view(B, L, -1, self.hd), v.view(B, L, -1, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values at their slots, attend over the cache
            kc, vc = cache
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            k, v = (kc, vc) if kv_len is None else (kc[:, :, :kv_len], vc[:, :, :kv_len])
        out = attend(q, k, v, mask, self.scale, self.softcap, getattr(self, "sinks", None))  # [B, H, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs, hidden: int | None = None, fused: bool = False):
        super().__init__()
        hidden = hidden or a.intermediate_size
        self.act, self.fused = ACT[a.hidden_act], fused
        if fused:  # phi3: [gate; up] in one matrix
            self.gate_up_proj = nn.Linear(a.hidden_size, 2 * hidden, bias=a.mlp_bias)
        else:
            self.gate_proj = nn.Linear(a.hidden_size, hidden, bias=a.mlp_bias)
            self.up_proj = nn.Linear(a.hidden_size, hidden, bias=a.mlp_bias)
        self.down_proj = nn.Linear(hidden, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.act(gate))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        if a.kv_lora_rank:
            from .mla import MLAttention

            self.self_attn = MLAttention(a)
        else:
            self.self_attn = Attention(a, i)
        if a.moe and a.moe_layers[i]:
            setattr(self, "block_sparse_moe" if a.moe in MIXTRAL_NAMED else "mlp", SparseMoe(a))
        else:
            self.mlp = MLP(a, fused=a.fused_qkv)
        self.ffn_name = "block_sparse_moe" if a.moe in MIXTRAL_NAMED and a.moe_layers[i] else "mlp"
        self.gemma = a.gemma
        self.input_layernorm = make_norm(a)
        self.post_attention_layernorm = make_norm(a)
        if a.gemma:  # sandwich norms around attention and MLP
            self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, True)

    def forward(self, x, cos, sin, mask, cache=None, slots=None, kv_len=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, kv_len)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))
