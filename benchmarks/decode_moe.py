"""MoE helpers for `decode.py`: share transformers' stacked experts with the native class, and count the
bytes a decode step reads (the experts it actually touches).

Bytes of one step: every weight but the embedding table and the experts (attention, norms, routers,
shared experts, lm_head), plus, per sparse layer, the distinct experts the step's rows route to times
the bytes of one expert ([gate; up] and down). At batch 1 that is top_k experts a layer; at batch B
the routing of the benchmark's own generated tokens is replayed through the native module and the
distinct experts per layer are counted at every decode position.
"""

from __future__ import annotations

import torch

from mlx_bridge.deploy.native.moe import route


def share_experts(hf, native) -> None:
    """Load `hf`'s tensors into `native` (built on meta): the stacked experts of transformers'
    `*Experts` (gate_up_proj (E, 2I, D), down_proj (E, D, I)) are adopted by `SparseMoe.stack`."""
    state = hf.state_dict()
    if native.args.moe == "gpt_oss":  # stacked under the same names in both
        native.load_state_dict(state, strict=True, assign=True)
        return
    stacked = {k: v for k, v in state.items() if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))}
    rest = {k: v for k, v in state.items() if k not in stacked}
    res = native.load_state_dict(rest, strict=False, assign=True)
    assert not res.unexpected_keys, res.unexpected_keys[:5]
    for i, layer in enumerate(native.model.layers):
        ffn = getattr(layer, layer.ffn_name)
        if hasattr(ffn, "experts"):
            p = f"model.layers.{i}.{layer.ffn_name}.experts."
            ffn.stack(stacked[p + "gate_up_proj"], stacked[p + "down_proj"])
    meta = [n for n, t in native.state_dict().items() if t.is_meta]
    assert not meta, f"not shared: {meta[:5]}"


def sparse_layers(native) -> list:
    return [getattr(l, l.ffn_name) for l in native.model.layers if hasattr(getattr(l, l.ffn_name), "experts")]


def step_bytes(native, experts_per_layer: float) -> tuple[float, float]:
    """(bytes of the non-expert weights a step reads, bytes of `experts_per_layer` experts in every
    sparse layer)."""
    moes = sparse_layers(native)
    expert_ids = set()
    for m in moes:
        expert_ids |= {id(p) for p in m.experts.parameters()}
    emb = native.model.embed_tokens.weight
    dense = sum(p.numel() * p.element_size() for p in native.parameters() if id(p) not in expert_ids and p is not emb)
    if native.args.tie_word_embeddings:
        dense += emb.numel() * emb.element_size()  # the head reads the whole table
    E = native.args.num_experts
    one = sum(p.numel() * p.element_size() for p in moes[0].experts.parameters()) / E if moes else 0
    return float(dense), float(len(moes) * experts_per_layer * one)


def pick(m, logits: torch.Tensor) -> torch.Tensor:
    """The expert ids (T, k) a sparse layer routes its router logits to (PyTorch ops on every device:
    group routing as `SparseMoe.pick`, the others `route`)."""
    return m.pick(logits)[1] if m.group else route(logits, m.kind, m.top_k, m.norm_topk)[1]


def touched_experts(native, rows: torch.Tensor, P: int, chunk: int = 4) -> float:
    """Mean over decode positions P..L-1 of the distinct experts per sparse layer that the B rows of
    `rows` (B, L) route to (their own routing, replayed through the native module)."""
    moes, picks = sparse_layers(native), []
    for m in moes:
        m._picks = []
        m._hook = m.gate_linear.register_forward_hook(lambda g, i, logits, m=m: m._picks.append(pick(m, logits)))
    with torch.inference_mode():
        for s in range(0, rows.shape[0], chunk):
            native(rows[s:s + chunk])
    B, L = rows.shape
    for m in moes:
        m._hook.remove()
        idx = torch.cat([t.view(-1, L, t.shape[-1]) for t in m._picks])  # (B, L, k)
        onehot = torch.zeros(L, native.args.num_experts, device=idx.device)
        for b in range(B):  # how many rows pick each expert, per position
            onehot.scatter_add_(1, idx[b], torch.ones(idx[b].shape, device=idx.device))
        picks.append((onehot[P:] > 0).sum(1).float().mean().item())
        del m._picks, m._hook
    return sum(picks) / len(picks)
