"""Sparse mixture-of-experts blocks: routing as each type's transformers class computes it, experts
stacked once into (E, 2I, D) `[gate; up]` and (E, D, I) `down` tensors, and the routed expert products.

`SparseMoe` keeps Hugging Face's per-expert parameter names (`experts.{e}.w1.weight` for mixtral,
`experts.{e}.gate_proj.weight` for the qwen/olmoe types), so an export loads with `strict=True`;
`stack()` builds the stacked tensors on the parameters' device and rebinds every per-expert weight as a
view of them (memory is not doubled, `state_dict()` keeps the names).

gpt_oss checkpoints hold the experts stacked already ((E, D, 2I) with gate and up interleaved, biases);
`stack()` stores them transposed once ((E, 2I, D) rows gate 0, up 0, gate 1, ...; down (E, D, I)) and
the parameters become transposed views of that (same names and shapes), so the kernels read rows.

Two implementations of the same routed product, `experts(x, w, idx, ex, glu)`:
    `experts_ref`  pure PyTorch, the loop over hit experts transformers runs (CPU, tests, reference)
    `moe_kernels.routed_experts`  Triton on CUDA, reading only the selected experts' weights
                   (graph-capturable, compiles as an op): at decode a block per routed row, else rows
                   grouped by expert with static shapes and grouped GEMMs
On CUDA the routing (softmax, top-k, normalisation, cast) is one kernel too (`routing`); phimoe's
sparsemixer and glm4_moe's / deepseek_v3's sigmoid group-limited routing (`group_route`) stay PyTorch ops.

Example:
    >>> import torch
    >>> w, idx = route(torch.tensor([[0.0, 2.0, 1.0]]), "qwen3_moe", top_k=2, norm=True)
    >>> idx.tolist(), [round(v, 4) for v in w[0].tolist()]
    ([[1, 2]], [0.7311, 0.2689])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs

# MoE types and the names of their per-expert (gate, up, down) linears in Hugging Face checkpoints
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "phimoe": ("w1", "w3", "w2")}
MIXTRAL_NAMED = ("mixtral", "phimoe")  # checkpoints name the sparse block `block_sparse_moe`
GROUP_ROUTED = ("glm4_moe", "glm4_moe_lite", "deepseek_v3")  # `group_route` (PyTorch ops), a float32 `GroupRouter`
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")


def sparsemixer(scores: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """phimoe's router at inference (transformers' `sparsemixer` with training=False), 2 experts a token.

    Twice: the best remaining expert; its weight is its softmax probability (in the logits' dtype) over the
    experts whose logit is within 2 * jitter of it, relative to max(|logit|, best); the second round
    masks the first expert out of the candidates (the relative distance still uses every logit).
    """
    top, first = scores.max(dim=-1, keepdim=True)
    far = (top - scores) / scores.abs().clamp(min=top) > 2 * jitter
    w1 = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, first)
    masked = torch.scatter(scores, -1, first, float("-inf"))
    top, second = masked.max(dim=-1, keepdim=True)
    far = (top - scores) / scores.abs().clamp(min=top) > 2 * jitter
    w2 = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1).gather(-1, second)
    return torch.cat((w1, w2), dim=-1), torch.cat((first, second), dim=-1)


def route(logits: torch.Tensor, kind: str, top_k: int, norm: bool, jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k), expert ids (T, k)) from router logits (T, E), as transformers' routers compute them.

    mixtral: softmax in float32, top-k, renormalised, kept in float32 (`MixtralTopKRouter`).
    qwen2_moe / qwen3_moe / olmoe: softmax in float32, top-k, renormalised when `norm`
    (`norm_topk_prob`), cast back to the logits' dtype.
    gpt_oss: top-k of the logits, softmax over those k in the logits' dtype (`GptOssTopKRouter`).
    phimoe: `sparsemixer` with `jitter` (`router_jitter_noise`), top_k 2.
    """
    if kind == "phimoe":
        return sparsemixer(logits, jitter)
    if kind == "gpt_oss":
        v, idx = torch.topk(logits, top_k, dim=-1)
        return F.softmax(v, dim=1, dtype=v.dtype), idx
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    if kind != "mixtral":
        w = w.to(logits.dtype)
    return w, idx


def group_route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm: bool, n_group: int, topk_group: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) float32, expert ids (T, k)) from float32 router logits (T, E), as glm4_moe's and
    deepseek_v3's `TopkRouter` compute them: sigmoid scores; the choice on scores + `bias`
    (`e_score_correction_bias`) within the `topk_group` groups whose two best experts score highest
    (of `n_group`); the weights are the chosen experts' plain scores, over their sum (+ 1e-20) when
    `norm`, times `scale` (`routed_scaling_factor`).

    Example:
        >>> w, idx = group_route(torch.tensor([[0.0, 3.0, -1.0, 1.0]]), torch.zeros(4), 2, True, 2, 1, 1.0)
        >>> sorted(idx[0].tolist())
        [0, 1]
    """
    scores = logits.sigmoid()
    choice = scores + bias
    T, E = choice.shape
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, n_group]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
    keep = keep[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    idx = torch.topk(choice.masked_fill(~keep, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, idx


def _oss_glu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt_oss's clamped SwiGLU of interleaved [g0, u0, g1, u1, ...] (`GptOssExperts._apply_gate`)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_ref(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, ex: tuple, glu: tuple | None = None) -> torch.Tensor:
    """Routed expert products (T, D) for tokens x (T, D), weights w and ids idx (T, k), the loop over
    hit experts that transformers runs (`MixtralExperts.forward`, `GptOssExperts.forward`).

    ex = (gate_up, gate_up_bias, down, down_bias). glu None: rows layout, gate_up (E, 2I, D) rows
    `[gate; up]`, down (E, D, I), silu(gate) * up, no biases. glu = (alpha, limit): gpt_oss layout,
    gate_up (E, D, 2I) interleaved, down (E, I, D), biases, clamped SwiGLU.
    """
    gate_up, bgu, down, bd = ex
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():  # the experts this batch hits (a host sync: reference only)
        tok, k = torch.where(idx == e)
        if glu is None:
            gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down[e])
        else:
            y = _oss_glu(x[tok] @ gate_up[e] + bgu[e], *glu) @ down[e] + bd[e]
        out.index_add_(0, tok, (y * w[tok, k, None]).to(out.dtype))
    return out


def experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, ex: tuple, glu: tuple | None = None) -> torch.Tensor:
    """Routed expert products (T, D): the Triton kernels on CUDA (the k weighted rows of a token summed
    here in float32, one row after the other: elementwise adds, so a compiled layer fuses the sum into
    its residual add and the norm after it), `experts_ref` elsewhere."""
    if x.is_cuda:  # registered by importing runners.moe_kernels (`SparseMoe.stack` on a CUDA device)
        alpha, limit = glu if glu is not None else (0.0, 0.0)
        y = torch.ops.mlx_bridge.routed_experts(x, w, idx, ex[0], ex[1], ex[2], ex[3], glu is not None, alpha, limit)
        y = y.view(*idx.shape, x.shape[1])  # (T k, D) float32 -> (T, k, D)
        out = y[:, 0]
        for j in range(1, y.shape[1]):
            out = out + y[:, j]
        return out.to(x.dtype)
    return experts_ref(x, w, idx, ex, glu)


def routing(logits: torch.Tensor, kind: str, top_k: int, norm: bool, jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` on CPU; on CUDA the same routing as one Triton kernel (`moe_kernels.route_fused`), but for
    phimoe's sparsemixer, which stays PyTorch ops (on the device, no host sync: compiled and captured)."""
    if logits.is_cuda and kind != "phimoe":
        return torch.ops.mlx_bridge.route_topk(logits, kind, top_k, norm)
    return route(logits, kind, top_k, norm, jitter)


def sparse_ffn(x: torch.Tensor, router: tuple, ex: tuple, kind: str, top_k: int, norm: bool,
               shared: tuple | None = None, glu: tuple | None = None, jitter: float = 0.0,
               group: tuple | None = None) -> torch.Tensor:
    """The whole sparse MLP of tokens x (T, D): route (router = (weight, bias); for `group` = (n_group,
    topk_group, scale) the float32 router (weight, e_score_correction_bias) of `group_route`), routed
    experts, and the shared expert `shared` = ([gate; up] (2S, D), down (D, S), gate (1, D) or None):
    qwen2_moe's scaled by sigmoid(gate x), glm4_moe's ungated."""
    if group is not None:
        w, idx = group_route(F.linear(x.float(), router[0].float()), router[1], top_k, norm, *group)
    else:
        w, idx = routing(F.linear(x, *router), kind, top_k, norm, jitter)
    out = experts(x, w, idx, ex, glu)
    if shared is not None:
        sgu, sd, sg = shared
        g, u = F.linear(x, sgu).chunk(2, dim=-1)
        s = F.linear(F.silu(g) * u, sd)
        out = out + (s if sg is None else torch.sigmoid(F.linear(x, sg)) * s)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(idx: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the routed rows of idx (T, k) by expert, static shapes: (sorted row ids (n_blocks * BM,),
    padded with T k; expert of each block (n_blocks,), E past the last one).

    Example:
        >>> ids, be = align(torch.tensor([[2, 0], [2, 1]]), E=4, BM=2)
        >>> ids.tolist(), be.tolist()
        ([1, 4, 3, 4, 0, 2, 4, 4], [0, 1, 2, 4])
    """
    flat = idx.reshape(-1)
    R = flat.numel()
    n_blocks = _cdiv(R + min(E, R) * (BM - 1), BM)
    counts = torch.zeros(E, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BM - 1) // BM * BM
    ends = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices  # rows by expert, in row order within an expert
    se = flat[order]
    rank = torch.arange(R, device=idx.device) - (counts.cumsum(0) - counts)[se]
    dest = (ends - padded)[se] + rank
    ids = torch.full((n_blocks * BM,), R, dtype=torch.long, device=idx.device).scatter_(0, dest, order)
    block_expert = torch.searchsorted(ends, torch.arange(n_blocks, device=idx.device) * BM, right=True)
    return ids, block_expert


class OssExperts(nn.Module):
    """gpt_oss's stacked experts under its checkpoint names: gate_up_proj (E, D, 2I) with gate and up
    interleaved, gate_up_proj_bias (E, 2I), down_proj (E, I, D), down_proj_bias (E, D)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        E, D, I = a.num_experts, a.hidden_size, a.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj_bias = nn.Parameter(torch.empty(E, D))


class GroupRouter(nn.Module):
    """glm4_moe's and deepseek_v3's router: `weight` (E, D) and `e_score_correction_bias` (E,), both kept in
    float32 (as transformers keeps them); forward gives float32 logits (T, E)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.num_experts, a.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(a.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class _Expert(nn.Module):
    """One expert's three linears under its checkpoint names (mixtral w1/w3/w2, else gate/up/down_proj)."""

    def __init__(self, a: ModelArgs, names: tuple[str, str, str]):
        super().__init__()
        g, u, d = names
        setattr(self, g, nn.Linear(a.hidden_size, a.moe_intermediate_size, bias=False))
        setattr(self, u, nn.Linear(a.hidden_size, a.moe_intermediate_size, bias=False))
        setattr(self, d, nn.Linear(a.moe_intermediate_size, a.hidden_size, bias=False))


class SparseMoe(nn.Module):
    """Top-k routed experts: the router (`gate` (E, D); gpt_oss `router` with a bias; glm4_moe and deepseek_v3
    a float32 `GroupRouter`), the experts (`experts.{e}`; gpt_oss stacked `OssExperts`), and for qwen2_moe a
    shared expert (`shared_expert`, an MLP) scaled by sigmoid(`shared_expert_gate`), for glm4_moe and
    deepseek_v3 `shared_experts` added ungated."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        from .layers import MLP

        self.kind, self.top_k, self.norm_topk, self.jitter = a.moe, a.top_k, a.norm_topk_prob, a.router_jitter
        oss = a.moe == "gpt_oss"
        self.group = (a.n_group, a.topk_group, a.routed_scaling_factor) if a.moe in GROUP_ROUTED else None
        self.gate_name = "router" if oss else "gate"
        router = GroupRouter(a) if self.group else nn.Linear(a.hidden_size, a.num_experts, bias=oss)
        setattr(self, self.gate_name, router)
        self.glu = (a.swiglu_alpha, a.swiglu_limit) if oss else None
        self.names = EXPERT_NAMES.get(a.moe, QWEN_NAMES)
        if oss:
            self.experts = OssExperts(a)
        else:
            self.experts = nn.ModuleList([_Expert(a, self.names) for _ in range(a.num_experts)])
        if a.shared_expert_intermediate_size:
            self.shared_expert = MLP(a, a.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(a.hidden_size, 1, bias=False)
        if a.shared_experts_intermediate_size:  # glm4_moe: added ungated
            self.shared_experts = MLP(a, a.shared_experts_intermediate_size)
        self.shared = bool(a.shared_expert_intermediate_size)
        self.stacked: tuple | None = None

    @property
    def gate_linear(self) -> nn.Module:
        """The router module: logits (T, E) of tokens (T, D)."""
        return getattr(self, self.gate_name)

    def router_weights(self) -> tuple:
        """(weight, bias or None), glm4_moe's (weight, e_score_correction_bias), as `sparse_ffn` takes them."""
        g = self.gate_linear
        return (g.weight, g.e_score_correction_bias) if self.group else (g.weight, g.bias)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (T, k), expert ids (T, k)) from the router's logits (T, E), as transformers computes them."""
        if self.group:
            bias = self.gate_linear.e_score_correction_bias
            return group_route(logits, bias, self.top_k, self.norm_topk, *self.group)
        return routing(logits, self.kind, self.top_k, self.norm_topk, self.jitter)

    def stack(self, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> tuple:
        """The experts as (gate_up, gate_up_bias, down, down_bias), stacked once: the per-expert weights
        are stacked (or given stacked tensors, e.g. transformers' own, are adopted) and rebound as views
        of them. gpt_oss's are stacked in the checkpoint already."""
        if gate_up is None and self.stacked is not None:
            return self.stacked
        if self.glu is not None:
            ex = self.experts
            if ex.gate_up_proj.stride(1) != 1:  # stored (E, D, 2I) and (E, I, D): keep each row of the
                with torch.no_grad():  # products contiguous along D / I (kernels read whole rows), once
                    gu, dn = (ex.gate_up_proj.transpose(1, 2).contiguous(), ex.down_proj.transpose(1, 2).contiguous())
                ex.gate_up_proj = nn.Parameter(gu.transpose(1, 2), requires_grad=False)  # same shape, a view
                ex.down_proj = nn.Parameter(dn.transpose(1, 2), requires_grad=False)
            self.stacked = (ex.gate_up_proj, ex.gate_up_proj_bias, ex.down_proj, ex.down_proj_bias)
        else:
            g, u, d = self.names
            ex = list(self.experts)
            with torch.no_grad():
                if gate_up is None:
                    gate_up = torch.stack([torch.cat([getattr(e, g).weight, getattr(e, u).weight]) for e in ex])
                    down = torch.stack([getattr(e, d).weight for e in ex])
                inter = gate_up.shape[1] // 2
                for i, e in enumerate(ex):
                    getattr(e, g).weight = nn.Parameter(gate_up[i, :inter], requires_grad=False)
                    getattr(e, u).weight = nn.Parameter(gate_up[i, inter:], requires_grad=False)
                    getattr(e, d).weight = nn.Parameter(down[i], requires_grad=False)
            self.stacked = (gate_up, None, down, None)
        if self.stacked[0].is_cuda:
            from ..runners import moe_kernels  # noqa: F401 (registers torch.ops.mlx_bridge.routed_experts, route_topk)
        return self.stacked

    def _apply(self, fn, recurse=True):
        self.stacked = None  # a move or cast copies the per-expert weights: stack again
        return super()._apply(fn, recurse)

    def route(self, x):
        """(weights (T, k), expert ids (T, k)) for tokens x (T, D), as transformers computes them."""
        return self.pick(self.gate_linear(x))

    def forward(self, x):
        B, L, D = x.shape
        x = x.reshape(-1, D)  # [T, D]
        ex = self.stack()
        w, idx = self.route(x)
        out = experts(x, w, idx, ex, self.glu)
        if self.shared:  # qwen2_moe: + sigmoid(gate(x)) * shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if hasattr(self, "shared_experts"):  # glm4_moe: + shared_experts(x)
            out = out + self.shared_experts(x)
        return out.view(B, L, D)
