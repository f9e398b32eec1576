"""Sparse mixture-of-experts blocks: routing as each type's transformers class computes it, experts
stacked once into (E, 2I, D) `[gate; up]` and (E, D, I) `down` tensors, and the routed expert products.

`SparseMoe` keeps Hugging Face's per-expert parameter names (`experts.{e}.w1.weight` for mixtral,
`experts.{e}.gate_proj.weight` for the qwen/olmoe types), so an export loads with `strict=True`;
`stack()` builds the stacked tensors on the parameters' device and rebinds every per-expert weight as a
view of them (memory is not doubled, `state_dict()` keeps the names).

Two implementations of the same routed product, `experts(x, w, idx, gate_up, down)`:
    `experts_ref`  pure PyTorch, the loop over hit experts transformers runs (CPU, tests, reference)
    `moe_kernels.routed_experts`  Triton on CUDA: rows grouped by expert with static shapes, one grouped
                   GEMM reading only the selected experts' weights (graph-capturable, compiles as an op)

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
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")


def route(logits: torch.Tensor, kind: str, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k), expert ids (T, k)) from router logits (T, E), as transformers' routers compute them.

    mixtral: softmax in float32, top-k, renormalised, kept in float32 (`MixtralTopKRouter`).
    qwen2_moe / qwen3_moe / olmoe: softmax in float32, top-k, renormalised when `norm`
    (`norm_topk_prob`), cast back to the logits' dtype.
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    if kind != "mixtral":
        w = w.to(logits.dtype)
    return w, idx


def experts_ref(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Routed expert products (T, D) for tokens x (T, D), weights w and ids idx (T, k), stacked experts
    gate_up (E, 2I, D) and down (E, D, I): transformers' loop (`MixtralExperts.forward`): per hit
    expert, its tokens' `[gate; up]` product, silu(gate) * up, down, times the routing weight, added
    in x's dtype."""
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():  # the experts this batch hits (a host sync: reference only)
        tok, k = torch.where(idx == e)
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * w[tok, k, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """Routed expert products (T, D): the Triton grouped path on CUDA, `experts_ref` elsewhere."""
    if x.is_cuda:  # registered by importing runners.moe_kernels (`SparseMoe.stack` on a CUDA device)
        return torch.ops.mlx_bridge.routed_experts(x, w, idx, gate_up, down)
    return experts_ref(x, w, idx, gate_up, down)


def sparse_ffn(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, kind: str,
               top_k: int, norm: bool, shared: tuple | None = None) -> torch.Tensor:
    """The whole sparse MLP of tokens x (T, D): route, routed experts, and for qwen2_moe the shared
    expert `shared` = ([gate; up] (2S, D), down (D, S), gate (1, D)) scaled by sigmoid(gate x)."""
    w, idx = route(F.linear(x, router), kind, top_k, norm)
    out = experts(x, w, idx, gate_up, down)
    if shared is not None:
        sgu, sd, sg = shared
        g, u = F.linear(x, sgu).chunk(2, dim=-1)
        out = out + torch.sigmoid(F.linear(x, sg)) * F.linear(F.silu(g) * u, sd)
    return out


class _Expert(nn.Module):
    """One expert's three linears under its checkpoint names (mixtral w1/w3/w2, else gate/up/down_proj)."""

    def __init__(self, a: ModelArgs, names: tuple[str, str, str]):
        super().__init__()
        g, u, d = names
        setattr(self, g, nn.Linear(a.hidden_size, a.moe_intermediate_size, bias=False))
        setattr(self, u, nn.Linear(a.hidden_size, a.moe_intermediate_size, bias=False))
        setattr(self, d, nn.Linear(a.moe_intermediate_size, a.hidden_size, bias=False))


class SparseMoe(nn.Module):
    """Top-k routed experts: `gate` (E, D) router, `experts.{e}`, and for qwen2_moe a shared expert
    (`shared_expert`, an MLP) scaled by sigmoid(`shared_expert_gate`)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        from .layers import MLP

        self.kind, self.top_k, self.norm_topk = a.moe, a.top_k, a.norm_topk_prob
        self.names = EXPERT_NAMES.get(a.moe, QWEN_NAMES)
        self.gate = nn.Linear(a.hidden_size, a.num_experts, bias=False)
        self.experts = nn.ModuleList([_Expert(a, self.names) for _ in range(a.num_experts)])
        if a.shared_expert_intermediate_size:
            self.shared_expert = MLP(a, a.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(a.hidden_size, 1, bias=False)
        self.shared = bool(a.shared_expert_intermediate_size)
        self.stacked: tuple | None = None

    def stack(self, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> tuple:
        """Stack the experts once (or adopt given stacked tensors, e.g. transformers' own) and rebind the
        per-expert weights as views of them; return the stacked weights."""
        if gate_up is None and self.stacked is not None:
            return self.stacked
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
        if gate_up.is_cuda:
            from ..runners import moe_kernels  # noqa: F401 (registers torch.ops.mlx_bridge.routed_experts)
        self.stacked = (gate_up, down)
        return self.stacked

    def _apply(self, fn, recurse=True):
        self.stacked = None  # a move or cast copies the per-expert weights: stack again
        return super()._apply(fn, recurse)

    def route(self, x):
        """(weights (T, k), expert ids (T, k)) for tokens x (T, D), as transformers computes them."""
        return route(self.gate(x), self.kind, self.top_k, self.norm_topk)

    def forward(self, x):
        B, L, D = x.shape
        x = x.reshape(-1, D)  # [T, D]
        gate_up, down = self.stacked or self.stack()
        w, idx = self.route(x)
        out = experts(x, w, idx, gate_up, down)
        if self.shared:  # qwen2_moe: + sigmoid(gate(x)) * shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, L, D)
