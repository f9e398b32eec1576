"""The fast path's model code: the native `Transformer` as pure functions over fused weights.

`fuse(module)` runs once at load time. Per layer it concatenates q/k/v into one `[q; k; v]` matrix and
gate/up into one `[gate; up]` matrix (the export stays Hugging Face layout) and rebinds the module's own
q/k/v/gate/up parameters as views of them, so memory is not doubled and `module.state_dict()` keeps
Hugging Face names. The functions below compute what `model.Transformer.step` computes (same norms in
float32, same rope, same masks) with fewer, larger kernels:

    make_layer(spec, decode)  one decoder layer; every layer has the same shapes, so one compiled
                              graph serves all of them (compile time does not grow with depth);
                              its halves `make_qkv` and `make_out` around the attention
    make_norm(spec)           a layer's input norm (the first of the decode chain)
    rope_masks(...)           cos/sin per rope setting and one mask per sliding window, once a step
    make_head(spec)           final norm, lm_head, softcap

Decode attends over the whole static cache slice with a mask (static shapes, graph-capturable): on
CUDA with the Triton decode kernel (`attn_kernels`, split over the cache), elsewhere with SDPA, a GQA
query folded to (B, H_kv, H/H_kv, hd) so it needs no repeated keys. Prefill writes the cache
and attends over its own keys with SDPA, `is_causal` (flash) when there is no padding and no window.
MoE layers: the experts are stacked once (`SparseMoe.stack`); the layer routes in the compiled code
and calls the routed-experts op (`moe_kernels`: Triton, reads only the selected experts), so dense and
sparse layers compile and capture alike (a sparse layer's weight tuple is longer: its own graph).
At prefill (and off CUDA at decode) attention sinks (gpt_oss) use the eager attention formula inside
the compiled layer, as softcaps do.

Example:
    >>> import torch
    >>> from mlx_bridge.deploy.native.config import ModelArgs, RopeArgs
    >>> from mlx_bridge.deploy.native.model import Transformer
    >>> m = Transformer(ModelArgs("llama", 32, 16, 32, 1, 2, 1, 8, windows=[None], ropes=[RopeArgs(dim=8)]))
    >>> f = fuse(m)
    >>> f.layers[0].w[4].shape, m.model.layers[0].self_attn.k_proj.weight.data_ptr() == f.layers[0].w[4][16:].data_ptr()
    (torch.Size([32, 16]), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..native.layers import ACT, attend, norm_weights
from ..native.layers import norm as rms  # one definition for the module and the fused functions (RMSNorm, or
# LayerNorm where the weight is a (weight, bias) pair: phimoe)
from ..native.moe import GROUP_ROUTED, sparse_ffn
from ..native.model import Transformer, masks
from ..native.rope import apply_rope, cos_sin


DECODE_KERNEL_MAX_HD = 256  # larger heads attend with SDPA: the kernel's key tiles would crowd shared memory


class NotFusable(Exception):
    """The module has layers the fused functions do not cover (the message says which)."""


@dataclass(frozen=True)
class Spec:
    """Static numbers of one model (closed over by the compiled functions)."""

    nh: int
    nkv: int
    hd: int
    eps: float
    gemma: bool
    act: str
    scale: float
    softcap: float | None
    qk_norm: bool
    final_softcap: float | None
    embed_scale: float | None  # gemma: sqrt(hidden) rounded to the model dtype
    qk_norm_full: bool = False  # olmoe: q/k norms over all heads, before the head split
    clip_qkv: float | None = None
    moe: str | None = None  # routing kind (native.moe.route)
    top_k: int = 0
    norm_topk: bool = True
    glu: tuple | None = None  # gpt_oss experts: (alpha, limit) of the clamped SwiGLU
    jitter: float = 0.0  # phimoe: sparsemixer's jitter_eps
    group: tuple | None = None  # glm4_moe: (n_group, topk_group, routed_scaling_factor) of `group_route`
    # deepseek_v3 (`mla_fused`): (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, q_lora_rank,
    # rope_interleave); hd is then v_head_dim (what `make_out` projects)
    mla: tuple | None = None


@dataclass
class Layer:
    # (ln1, ln2, ln_pre_ff, ln_post_ff, wqkv, bqkv, wo, bo, q_norm, k_norm, sinks) + the MLP's, None if absent:
    # dense (wgu, bgu, wd, bd); sparse (router, router_bias, gate_up, gate_up_bias, down, down_bias, shared)
    w: tuple
    window: int | None
    rope: int
    device: torch.device


@dataclass
class Fused:
    spec: Spec
    layers: list[Layer]
    embed: torch.Tensor
    norm: torch.Tensor | tuple  # the final norm's weight, or (weight, bias) for a LayerNorm (phimoe)
    head: torch.Tensor
    ropes: list[tuple[torch.Tensor, float]]  # per distinct rope setting: (inv_freq float32, cos/sin scale)
    windows: list[int]  # distinct sliding windows
    head_bias: torch.Tensor | None = None  # phimoe's lm_head bias

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys([self.embed.device, *(l.device for l in self.layers), self.head.device]))


def _fuse_rows(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along out-features; rebind each as a view."""
    w = torch.cat([l.weight for l in linears])
    b = torch.cat([l.bias for l in linears]) if linears[0].bias is not None else None
    o = 0
    for l in linears:
        n = l.weight.shape[0]
        l.weight = nn.Parameter(w[o:o + n], requires_grad=False)
        if b is not None:
            l.bias = nn.Parameter(b[o:o + n], requires_grad=False)
        o += n
    return w, b


def _bias(lin: nn.Linear):
    return lin.bias


def fuse(module: Transformer) -> Fused:
    """Fused weights of a loaded native `Transformer` (its parameters become views of them).

    Raises:
        NotFusable: the module has layers the functions do not cover.
    """
    a = module.args
    dtype = module.model.embed_tokens.weight.dtype
    mla = (a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank,
           a.rope_interleave) if a.kv_lora_rank else None
    spec = Spec(a.num_heads, a.num_kv_heads, a.v_head_dim if mla else a.head_dim, a.rms_norm_eps, a.gemma, a.hidden_act,
                a.attn_scale or a.head_dim ** -0.5, a.attn_softcap, a.qk_norm, a.final_softcap,
                float(torch.tensor(a.hidden_size ** 0.5).to(dtype)) if a.gemma else None,
                a.qk_norm_full, a.clip_qkv, a.moe, a.top_k, a.norm_topk_prob,
                (a.swiglu_alpha, a.swiglu_limit) if a.moe == "gpt_oss" else None, a.router_jitter,
                (a.n_group, a.topk_group, a.routed_scaling_factor) if a.moe in GROUP_ROUTED else None, mla)
    layers = []
    with torch.no_grad():
        for i, dl in enumerate(module.model.layers):
            at, mlp = dl.self_attn, getattr(dl, dl.ffn_name)
            if mla:  # latent attention: its own weights in the attention slots
                from .mla_fused import mla_weights

                w = (norm_weights(dl.input_layernorm), norm_weights(dl.post_attention_layernorm), None, None,
                     *mla_weights(at)) + _ffn_weights(mlp)
                layers.append(Layer(w, a.windows[i], module.rope_of_layer[i], w[4].device))
                continue
            if at.fused:
                wqkv, bqkv = at.qkv_proj.weight, at.qkv_proj.bias
            else:
                wqkv, bqkv = _fuse_rows([at.q_proj, at.k_proj, at.v_proj])
            g, qk = a.gemma, a.qk_norm or a.qk_norm_full
            w = (norm_weights(dl.input_layernorm), norm_weights(dl.post_attention_layernorm),
                 dl.pre_feedforward_layernorm.weight if g else None, dl.post_feedforward_layernorm.weight if g else None,
                 wqkv, bqkv, at.o_proj.weight, _bias(at.o_proj),
                 at.q_norm.weight if qk else None, at.k_norm.weight if qk else None,
                 getattr(at, "sinks", None)) + _ffn_weights(mlp)
            layers.append(Layer(w, a.windows[i], module.rope_of_layer[i], wqkv.device))
    if any(l.device.type == "cuda" for l in layers):
        from . import attn_kernels, rope_kernels  # noqa: F401 (register torch.ops.mlx_bridge.decode_attention, qk_rope_cache)
    embed = module.model.embed_tokens.weight
    head = embed if a.tie_word_embeddings else module.lm_head.weight
    head_bias = None if a.tie_word_embeddings else module.lm_head.bias
    norm = norm_weights(module.model.norm)
    if head.device != module.model.norm.weight.device:  # tied embedding, layers spread over devices: the head needs a copy
        head = head.to(module.model.norm.weight.device)
    ropes = [(getattr(module, f"rope_inv_freq_{j}"), module.rope_scale[j]) for j in range(len(module._ropes))]
    return Fused(spec, layers, embed, norm, head, ropes, list(module.windows), head_bias)


def _ffn_weights(mlp: nn.Module) -> tuple:
    """A dense MLP's (wgu, bgu, wd, bd), or a SparseMoe's (router, router_bias, gate_up, gate_up_bias, down,
    down_bias, shared)."""
    if hasattr(mlp, "experts"):
        shared = None
        if mlp.shared:
            se = mlp.shared_expert
            shared = (_fuse_rows([se.gate_proj, se.up_proj])[0], se.down_proj.weight, mlp.shared_expert_gate.weight)
        elif hasattr(mlp, "shared_experts"):  # glm4_moe: ungated
            se = mlp.shared_experts
            shared = (_fuse_rows([se.gate_proj, se.up_proj])[0], se.down_proj.weight, None)
        return (*mlp.router_weights(), *mlp.stack(), shared)
    if mlp.fused:
        wgu, bgu = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    else:
        wgu, bgu = _fuse_rows([mlp.gate_proj, mlp.up_proj])
    return wgu, bgu, mlp.down_proj.weight, _bias(mlp.down_proj)


def rope_masks(ropes: list, slots: torch.Tensor, pad: torch.Tensor, S: int, windows: list[int], dtype: torch.dtype,
               additive: bool) -> tuple[list, dict]:
    """Per rope setting (cos, sin) for queries at `slots` (L,) of rows with left padding `pad` (B,),
    and per window a mask over S keys (bool, or 0/-inf in `dtype` when `additive`)."""
    pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, L]
    rot = [cos_sin(inv, scale, pos, dtype) for inv, scale in ropes]
    ms = masks(slots, S, pad, windows)
    if additive:
        ms = {w: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) for w, m in ms.items()}
    return rot, ms


def _decode_attend(q, kc, vc, mask, scale: float, softcap: float | None, sinks=None):
    """q (B, H, 1, hd) over the whole cache kc, vc (B, H_kv, S, hd). CUDA: the Triton decode kernel
    (`attn_kernels`, registered by `fuse`; softcap and sinks included). Elsewhere SDPA with GQA folded
    into the query axis, or the eager formula for softcap and sinks."""
    if q.is_cuda and q.shape[-1] <= DECODE_KERNEL_MAX_HD:
        return torch.ops.mlx_bridge.decode_attention(q, kc, vc, mask, scale, softcap, sinks)
    if softcap is not None or sinks is not None:
        return attend(q, kc, vc, mask, scale, softcap, sinks)
    B, H, _, hd = q.shape
    o = F.scaled_dot_product_attention(q.reshape(B, kc.shape[1], H // kc.shape[1], hd), kc, vc,
                                       attn_mask=mask, scale=scale)  # [B, H_kv, H/H_kv, hd]
    return o.reshape(B, H, 1, hd)


def make_qkv(spec: Spec, rows: bool = False, kernel: bool = False) -> Callable:
    """qkv(x, w, kc, vc, cos, sin, slots) -> (q (B, H, L, hd), k, v (B, H_kv, L, hd)): the first half
    of a decoder layer (norm, fused projection, q/k norms, rope), keys and values written into the
    cache kc/vc at `slots` (L,) shared by the batch, or, with `rows`, each row's one new key at its
    own position `slots` (B,) (continuous batching: rows do not share positions), in cache row `at`
    (B,) (default: row b for row b; a mixed step's prompt tokens go to their slot). kc None: no write.
    `kernel`: on CUDA with one token a row, the q/k norms, rope and cache writes run as one Triton
    kernel (`rope_kernels`, registered by `fuse`) and k, v come back None (decode reads the cache).
    `h`: x already normalised by the layer's input norm (the previous layer computed it, `make_layer`).
    """
    nh, nkv, hd, eps, gemma, qk_norm = spec.nh, spec.nkv, spec.hd, spec.eps, spec.gemma, spec.qk_norm
    qk_full, clip = spec.qk_norm_full, spec.clip_qkv
    kernel = kernel and not qk_full and clip is None  # olmoe's whole-projection norms, clipping: PyTorch ops

    def qkv(x, w, kc, vc, cos, sin, slots, h=None, at=None):
        ln1, wqkv, bqkv, qn, kn = w[0], w[4], w[5], w[8], w[9]
        B, L, _ = x.shape  # x: [B, L, D]
        y = F.linear(rms(x, ln1, eps, gemma) if h is None else h, wqkv, bqkv)
        if kernel and x.is_cuda and L == 1 and kc is not None:
            return torch.ops.mlx_bridge.qk_rope_cache(y.view(B, -1), qn, kn, cos, sin, kc, vc, slots, nh, nkv, eps,
                                                      gemma), None, None
        q, k, v = y.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        if qk_full:
            q, k = rms(q, qn, eps, False), rms(k, kn, eps, False)
        if clip is not None:
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        q, k, v = q.view(B, L, nh, hd), k.view(B, L, nkv, hd), v.view(B, L, nkv, hd)
        if qk_norm:
            q, k = rms(q, qn, eps, gemma), rms(k, kn, eps, gemma)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kc is not None and rows:  # indexed assignment: inductor writes it in place (a scatter_ on the
            # cache was compiled as a copy of the whole cache and back, per layer and step)
            b = torch.arange(B, device=slots.device) if at is None else at
            kc[b, :, slots] = k[:, :, 0]
            vc[b, :, slots] = v[:, :, 0]
        elif kc is not None:
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
        return q, k, v

    return qkv


def make_out(spec: Spec) -> Callable:
    """out(x, o, w) -> x: the second half of a decoder layer: attention output o (B, H, L, hd)
    projected and added to x (B, L, D), then the MLP (gemma: with its extra norms; MoE: routed experts)."""
    nh, hd, eps, gemma, act = spec.nh, spec.hd, spec.eps, spec.gemma, ACT[spec.act]

    def mlp(h, ffn):
        if len(ffn) == 7:  # sparse
            B, L, D = h.shape
            return sparse_ffn(h.view(-1, D), ffn[:2], ffn[2:6], spec.moe, spec.top_k, spec.norm_topk, ffn[6],
                              spec.glu, spec.jitter, spec.group).view(B, L, D)
        wgu, bgu, wd, bd = ffn
        gate, up = F.linear(h, wgu, bgu).chunk(2, dim=-1)
        return F.linear(act(gate) * up, wd, bd)

    def out(x, o, w):
        ln2, ln_post, ln_pre, wo, bo = w[1], w[3], w[2], w[6], w[7]
        B, L, _ = x.shape
        o = F.linear(o.transpose(1, 2).reshape(B, L, nh * hd), wo, bo)
        if gemma:
            x = x + rms(o, ln2, eps, True)
            h = rms(x, ln_pre, eps, True)
        else:
            x = x + o
            h = rms(x, ln2, eps, gemma)
        m = mlp(h, w[11:])
        return x + (rms(m, ln_post, eps, True) if gemma else m)

    return out


def make_layer(spec: Spec, decode: bool, rows: bool = False) -> Callable:
    """layer(x, w, kc, vc, cos, sin, mask, slots) -> x: one decoder layer (pure but for the cache write).

    decode: x is (B, 1, D), attends over the first S positions of kc/vc with `mask` (B|1, 1, 1, S);
    else x is (B, L, D) written at `slots` and attends over its own keys (`mask` None: causal). kc None:
    no cache (scoring). `rows`: the decode step of continuous batching, each row's key written at its own
    position `slots` (B,) (`make_qkv`).
    Keywords h and nxt (the decode step's chain, one kernel a layer fewer): h is x after this layer's
    input norm, computed by the layer before; given nxt, the next layer's input norm weight (or the
    final norm's), the layer returns (x, x normalised by nxt), computed after its residual add.
    """
    if spec.mla:
        from .mla_fused import make_mla_layer

        return make_mla_layer(spec, decode)
    scale, softcap = spec.scale, spec.softcap
    qkv, out = make_qkv(spec, rows=rows, kernel=decode), make_out(spec)

    def layer(x, w, kc, vc, cos, sin, mask, slots, h=None, nxt=None):
        q, k, v = qkv(x, w, kc, vc, cos, sin, slots, h)
        sinks = w[10]  # gpt_oss attention sinks (None elsewhere)
        if decode:
            S = mask.shape[-1]  # the fast path's caches are S long; a slot pool's are longer
            o = _decode_attend(q, kc[:, :, :S], vc[:, :, :S], mask, scale, softcap, sinks)
        else:
            o = attend(q, k, v, mask, scale, softcap, sinks)  # [B, H, L, hd]
        return chain(out(x, o, w), nxt, spec)

    return layer


def chain(x: torch.Tensor, nxt, spec: Spec):
    """x, or (x, x normalised by the next norm `nxt`) (`make_layer`'s h and nxt)."""
    return x if nxt is None else (x, rms(x, nxt, spec.eps, spec.gemma))


def make_norm(spec: Spec) -> Callable:
    """norm(x, w) -> x under a layer's input norm weight w: the decode chain's first (`make_layer`'s h)."""
    eps, gemma = spec.eps, spec.gemma

    def norm(x, w):
        return rms(x, w, eps, gemma)

    return norm


def make_head(spec: Spec, normed: bool = False) -> Callable:
    """head(x (..., D), norm, lm_head, lm_head bias or None) -> logits (..., V) in the model dtype;
    `normed`: x is already normalised by the final norm (`norm` unused)."""
    eps, gemma, cap = spec.eps, spec.gemma, spec.final_softcap

    def head(x, norm, w, b=None):
        logits = F.linear(x if normed else rms(x, norm, eps, gemma), w, b)
        return torch.tanh(logits / cap) * cap if cap else logits

    return head


def embed(f: Fused, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, L, D) (times sqrt(D) for gemma, as the module does)."""
    h = F.embedding(tokens, f.embed)
    return h * f.spec.embed_scale if f.spec.embed_scale is not None else h
