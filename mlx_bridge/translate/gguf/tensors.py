"""GGUF tensors of a plan: llama.cpp names, order, layout (q/k permutation, norm shift, merged experts).

Each `GTensor` is made of one plan item, or of E items (one per expert) stacked into the (E, out, in)
tensor llama.cpp reads. `materialize` computes it in float32 (the plan is built at float32, so the
adapter is fused in float32 and nothing is rounded before quantization).

Example:
    >>> permute_qk(np.arange(8, dtype=np.float32).reshape(8, 1), n_head=2)[:, 0].tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import gguf
import numpy as np

from ...errors import raise_all
from ..parts import Item, materialize as materialize_item
from ..plan import Plan
from .archs import GgufArch, merged_expert_name, text_name


@dataclass
class GTensor:
    name: str  # llama.cpp name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order (rows last)
    items: list[Item]  # one, or one per expert (stacked on axis 0)
    n_head: int | None = None  # permute rows for llama-style rope with this many heads
    shift: float = 0.0
    op: str | None = None  # a layout op of OPS, before the permutation
    arg: tuple[int, ...] = ()  # the gdn ops' head counts and sizes

    @property
    def layer(self) -> int:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else -1

    def describe(self) -> str:
        src = self.items[0].describe() + (f" ... stack({len(self.items)} experts)" if len(self.items) > 1 else "")
        ops = ([self.op] if self.op else [f"permute_qk(n_head={self.n_head})"] if self.n_head else []) + \
            ([f"+{self.shift:g}"] if self.shift else [])
        return " -> ".join([src, *ops])


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qkv_by_kind(w: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused rows per head [q k v] -> [all q | all k | all v] (GPTNeoXModel.modify_tensors)."""
    return w.reshape(n_head, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def half(w: np.ndarray, k: int) -> np.ndarray:
    """Half `k` (0 or 1) of the rows (axis -2): GraniteMoe's gate|up -> gate, up (GraniteMoeModel.modify_tensors)."""
    n = w.shape[-2] // 2
    return np.ascontiguousarray(w[..., k * n:(k + 1) * n, :])


def gate_up(w: np.ndarray, k: int, interleaved: bool) -> np.ndarray:
    """Gate (k=0) or up (k=1) of a stacked (E, in, 2 out) gate_up weight as (E, out, in), or of its (E, 2 out) bias:
    the even/odd output columns (GptOss) or the first/second half (Llama4)."""
    n = w.shape[-1] // 2
    w = w[..., k::2] if interleaved else w[..., k * n:(k + 1) * n]
    return np.ascontiguousarray(w.swapaxes(-1, -2) if w.ndim == 3 else w)


def expert_items(item: Item, k: int) -> list[Item] | None:
    """Part `k` of a stacked HF expert weight (E, in, out), joined along its last axis, as E items (out, in): the MLX
    tensor it was transposed from (the layout llama.cpp reads), read one expert at a time, so it streams in row blocks
    like per-expert weights do. None where the part is more than a transpose of one stacked MLX tensor (an adapter).

    Example:
        >>> [i.shape for i in expert_items(plan_item("experts.down_proj"), 0)][:1]  # doctest: +SKIP
        [(2880, 2880)]
    """
    p = item.parts[k]
    if len(item.shape) != 3 or (len(item.parts) > 1 and item.axis != 2) or item.merge is not None or p.perm != (0, 2, 1) \
            or p.src.index is not None or p.lora or p.chunk or p.shift or p.zero or p.reshape is not None:
        return None
    q = p.quant
    shape = (item.shape[2] // len(item.parts), item.shape[1])
    return [Item(f"{item.name}[{e}]", item.dtype, shape, [replace(p, src=replace(p.src, index=e), perm=None, quant=q and replace(
        q, scales=replace(q.scales, index=e), biases=q.biases and replace(q.biases, index=e)))]) for e in range(item.shape[0])]


def mxfp4_source(t: GTensor) -> bool:
    """Whether every value of `t` is an MXFP4 value of the source, no adapter fused into it (so MXFP4 holds it exactly)."""
    return all(p.quant is not None and p.quant.mode == "mxfp4" and p.lora is None for i in t.items for p in i.parts)


def kv_b(w: np.ndarray, shape: tuple[int, ...], k: int) -> np.ndarray:
    """MLA's kv_b_proj (n_head x (nope + v), rank) -> k_b (n_head, rank, nope) for k=0 or v_b (n_head, v, rank) for
    k=1, the split llama.cpp's deepseek2 reads for absorbed attention (DeepseekV2Model.modify_tensors)."""
    w = w.reshape(shape[0], -1, w.shape[-1])
    if k == 0:
        return np.ascontiguousarray(w[:, : shape[2]].swapaxes(1, 2))
    return np.ascontiguousarray(w[:, w.shape[1] - shape[1]:])


def v_tiled(w: np.ndarray, axis: int, n_k: int, per_k: int, head_dim: int) -> np.ndarray:
    """V heads grouped by K head -> tiled order along `axis` (_LinearAttentionVReorderBase._reorder_v_heads)."""
    shape = w.shape
    w = w.reshape(*shape[:axis], n_k, per_k, head_dim, *shape[axis + 1:])
    return np.ascontiguousarray(w.swapaxes(axis, axis + 1).reshape(shape))


def gdn(op: str, w: np.ndarray, n_k: int, per_k: int, dk: int, dv: int) -> np.ndarray:
    """A gated-delta-net tensor as llama.cpp's qwen35 reads it (n_k key heads, per_k value heads each)."""
    if op in ("gdn_qkvz0", "gdn_qkvz1"):  # Qwen3-Next: per key head [q k v z] -> [all q | all k | all v], all z
        w = w.reshape(n_k, 2 * dk + 2 * per_k * dv, -1)
        if op == "gdn_qkvz1":
            return np.ascontiguousarray(w[:, 2 * dk + per_k * dv:].reshape(-1, w.shape[-1]))
        return np.concatenate([w[:, a:b].reshape(-1, w.shape[-1]) for a, b in
                               ((0, dk), (dk, 2 * dk), (2 * dk, 2 * dk + per_k * dv))])
    if op == "gdn_qkv":  # only the V rows move
        return np.concatenate([w[: 2 * n_k * dk], v_tiled(w[2 * n_k * dk:], 0, n_k, per_k, dv)])
    if op == "gdn_conv":  # (channels, 1, kernel) -> (channels, kernel), V channels tiled
        w = w.reshape(w.shape[0], -1)
        return np.concatenate([w[: 2 * n_k * dk], v_tiled(w[2 * n_k * dk:], 0, n_k, per_k, dv)])
    if op == "gdn_a":
        w = -np.exp(w)
    if op == "gdn_out":
        return v_tiled(w, 1, n_k, per_k, dv)
    return v_tiled(w, 0, n_k, per_k, dv if op == "gdn_z" else 1)


def half_t(w: np.ndarray, k: int) -> np.ndarray:
    """Half `k` of the columns, transposed: Qwen3-VL-MoE's (E, hidden, 2 x ff) gate|up -> (E, ff, hidden) each
    (Qwen3VLMoeTextModel.modify_tensors)."""
    n = w.shape[-1] // 2
    return np.ascontiguousarray(w[..., k * n:(k + 1) * n].swapaxes(-1, -2))


OPS = {"transpose": lambda w, n_head: np.ascontiguousarray(w.T), "qkv_by_kind": qkv_by_kind,
       "half_t0": lambda w, n_head: half_t(w, 0), "half_t1": lambda w, n_head: half_t(w, 1),
       "half0": lambda w, n_head: half(w, 0), "half1": lambda w, n_head: half(w, 1),
       "neg_exp": lambda w, n_head: -np.exp(w), "neg_exp_col": lambda w, n_head: -np.exp(w)[:, None],
       "col": lambda w, n_head: w[:, None], "groups": lambda w, n_groups: w.reshape(n_groups, -1),
       "squeeze": lambda w, n_head: np.ascontiguousarray(w.reshape(w.shape[0], -1)),
       "swap_last": lambda w, n_head: np.ascontiguousarray(w.swapaxes(-1, -2)),
       **{f"gate_up_{lay}{k}": (lambda k, i: lambda w, n_head: gate_up(w, k, i))(k, lay == "interleaved")
          for lay in ("interleaved", "halves") for k in (0, 1)}}


def materialize(t: GTensor) -> np.ndarray:
    """The float32 tensor llama.cpp expects for `t`."""
    if len(t.items) == 1:
        w = materialize_item(t.items[0])
    else:
        w = np.stack([materialize_item(i) for i in t.items])
    w = w.astype(np.float32, copy=False)
    if t.op and t.op.startswith("gdn_"):
        return gdn(t.op, w, *t.arg)
    if t.op in ("k_b", "v_b"):
        return kv_b(w, t.shape, t.op == "v_b")
    if t.op:
        return OPS[t.op](w, t.n_head)
    if t.n_head:
        w = permute_qk(w, t.n_head)
    if t.shift:
        w = w + np.float32(t.shift)
    return w


def scalar_hparams(plan: Plan, ga: GgufArch) -> dict[str, list[float]]:
    """The per-layer scalars llama.cpp reads as metadata: {GGUFWriter method: one value per layer, in layer order}."""
    out: dict[str, dict[int, float]] = {}
    for it in plan.items:
        method = next((m for k, m in ga.scalars.items() if text_name(it.name).endswith(k)), None)
        if method is not None:
            bid = int(re.search(r"\.(\d+)\.", it.name).group(1))
            out.setdefault(method, {})[bid] = float(materialize_item(it).reshape(()))
    return {m: [v[i] for i in sorted(v)] for m, v in out.items()}


def _rename(hf: str) -> str:
    """HF names convert_hf_to_gguf renames before mapping (a routing bias, Mamba2's dt_bias, GptOss's sinks and
    expert biases, AfMoE's expert bias)."""
    hf = re.sub(r"(experts\.\w+_proj)_bias$", r"\1.bias", re.sub(r"(\.sinks|experts\.down_proj)$", r"\1.weight", hf))
    hf = re.sub(r"\.dt_bias$", ".dt_proj.bias", hf.replace("e_score_correction_bias", "e_score_correction.bias"))
    return re.sub(r"mlp\.expert_bias$", "mlp.expert_bias.bias", hf)


def _sort_key(t: GTensor):
    """llama.cpp's weight_name_comparer: by layer (non-layer tensors first), then name."""
    return (t.layer, t.name)


def gguf_tensors(plan: Plan, ga: GgufArch, cfg: dict) -> list[GTensor]:
    """Every GGUF tensor of `plan`, in llama.cpp's order; BridgeError naming each unmappable tensor."""
    arch = plan.arch
    n_layer = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(ga.arch, n_layer)
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_head
    expert_tpl = {t: merged_expert_name(t) for t in arch.rules if "{e}" in t}  # per-expert HF templates
    groups: dict[str, list[Item]] = {}
    problems = []
    for it in plan.items:
        template, idx = arch.template(it.name)
        hf = text_name(it.name)
        if template in expert_tpl:  # one expert of a stacked tensor: layer index first, expert second
            hf = text_name(expert_tpl[template].replace("{}", str(idx[0]), 1))
        groups.setdefault(hf, []).append(it)
    out = []
    for hf, items in groups.items():
        if hf.endswith(tuple(ga.scalars) or ("\0",)):  # metadata (scalar_hparams), not a tensor
            continue
        pair = next((p for k, p in ga.halves.items() if hf.endswith(k)), None)
        if pair is not None:  # one HF tensor -> two llama.cpp tensors, a half of its rows each
            bid = int(re.search(r"\.(\d+)\.", hf).group(1))
            s, kind = items[0].shape, "half_t" if ga.halves_cols else "half"
            shape = (*s[:-2], s[-1] // 2, s[-2]) if ga.halves_cols else (*s[:-2], s[-2] // 2, s[-1])
            out += [GTensor(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight", shape, items, op=f"{kind}{k}")
                    for k, t in enumerate(pair)]
            continue
        pair = next((p for k, p in ga.gate_up.items() if hf.endswith(k)), None)
        if pair is not None:  # gate/up along the last axis -> two llama.cpp tensors
            bid, shape, kind = int(re.search(r"\.(\d+)\.", hf).group(1)), items[0].shape, "bias" if hf.endswith("bias") else "weight"
            shape = (shape[0], shape[2] // 2, shape[1]) if len(shape) == 3 else (shape[0], shape[1] // 2)
            gnames = [gguf.TENSOR_NAMES[t].format(bid=bid) + "." + kind for t in pair]
            per = [expert_items(items[0], k) if len(items) == 1 and len(items[0].parts) == 2 else None for k in (0, 1)]
            if all(per):  # gate and up are the two MLX tensors mlx-lm joined: written from them, expert by expert
                out += [GTensor(n, shape, p) for n, p in zip(gnames, per)]
            else:
                out += [GTensor(n, shape, items, op=f"gate_up_{ga.gate_up_layout}{k}") for k, n in enumerate(gnames)]
            continue
        if ga.mla and hf.endswith("kv_b_proj.weight"):  # -> attn_k_b, attn_v_b per head
            bid, (_, rank) = int(re.search(r"\.(\d+)\.", hf).group(1)), items[0].shape
            nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            out += [GTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_K_B].format(bid=bid) + ".weight", (n_head, rank, nope),
                            items, op="k_b"),
                    GTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_V_B].format(bid=bid) + ".weight", (n_head, v, rank),
                            items, op="v_b")]
            continue
        if ga.gdn and hf.endswith("in_proj_qkvz.weight"):  # Qwen3-Next: -> attn_qkv and attn_gate
            n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
            arg = (n_k, n_v // n_k, cfg["linear_key_head_dim"], cfg["linear_value_head_dim"])
            bid, (rows, cols), z = int(re.search(r"\.(\d+)\.", hf).group(1)), items[0].shape, n_v * arg[3]
            out += [GTensor(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight", (n, cols), items, op=f"gdn_qkvz{k}", arg=arg)
                    for k, (t, n) in enumerate(((gguf.MODEL_TENSOR.ATTN_QKV, rows - z), (gguf.MODEL_TENSOR.ATTN_GATE, z)))]
            continue
        base, _, suffix = _rename(hf).rpartition(".")
        name = names.get_name(base)
        if name is not None:
            name = f"{name}.{suffix}"
        else:  # a name mapped whole: a parameter with no suffix (Mamba's A_log, D), Falcon-H1's pre_ff_layernorm.weight
            name = names.get_name(_rename(hf))
        if name is None:
            problems.append(f"{hf}: llama.cpp ({ga.arch.name.lower()}) has no tensor for it")
            continue
        shape = items[0].shape if len(items) == 1 else (len(items), *items[0].shape)
        heads = None
        if ga.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif ga.permute_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        shift = ga.norm_shift if hf.endswith("norm.weight") and not hf.endswith(ga.no_shift or ("\0",)) else 0.0
        op = next((o for k, o in ga.ops.items() if hf.endswith(k)), None)
        per = expert_items(items[0], 0) if op == "swap_last" and len(items) == 1 else None
        if per:  # the stacked MLX tensor the HF one was transposed from, expert by expert
            out.append(GTensor(name, (shape[0], shape[2], shape[1]), per))
            continue
        arg = ()
        if op and op.startswith("gdn_"):
            n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
            arg = (n_k, n_v // n_k, cfg["linear_key_head_dim"], cfg["linear_value_head_dim"])
            if op == "gdn_conv":
                shape = (shape[0], int(np.prod(shape[1:])))
        elif op == "transpose":
            shape = shape[::-1]
        elif op == "swap_last":
            shape = (*shape[:-2], shape[-1], shape[-2])
        elif op == "squeeze":
            shape = (shape[0], int(np.prod(shape[1:])))
        elif op in ("neg_exp_col", "col"):  # Mamba2Model: A and D as (n_head, 1)
            shape = (*shape, 1)
        elif op == "groups":  # Mamba2Model: the gated norm per group, (n_groups, d_inner / n_groups)
            heads = cfg.get("n_groups") or cfg["mamba_n_groups"]
            shape = (heads, shape[0] // heads)
        elif op:
            heads = n_head
        out.append(GTensor(name, tuple(shape), items, heads, shift, op, arg))
    raise_all(problems, plan.source.path)
    return sorted(out, key=_sort_key)
