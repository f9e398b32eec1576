"""Routed MoE expert products on CUDA with Triton: only the selected experts' weights are read.

Two kernels, each program reading one expert's weight tile:

    _gate_up_act   h[r] = act(x[t] @ Wg[e]^T + bg) * (x[t] @ Wu[e]^T + bu)   (T k, I), act fused
    _down          y[r] = w[r] * (h[r] @ Wd[e]^T + bd)                       (T k, D) float32

over the routed rows r = t k + j, e = idx[t, j]. Decode (`gathers`: one token, or at most E / 2
rows): a block per routed row, its expert read by id, nothing grouped (the grouping's ~20 small
launches cost more than the batch-1 products). Otherwise the rows are grouped by expert with static
shapes (`native.moe.align`, vLLM's `moe_align_block_size` in PyTorch ops): rows sorted by expert id,
each expert's rows padded to a multiple of BLOCK_M, so a block of BLOCK_M sorted rows belongs to one
expert and an expert hit by several rows is read once per block; the number of blocks has a fixed
upper bound, ceil((T k + min(E, T k) (BLOCK_M - 1)) / BLOCK_M), and blocks past the last expert exit
at once. The caller sums the k rows of a token (in a compiled layer: fused into the residual add).
`_route` is the routing (softmax, top-k, renormalisation, cast) of `native.moe.route` as one kernel.
No host sync, no data-dependent shapes: the decode step captures in a CUDA graph, and
`routed_experts` / `route_topk` are `torch.library.custom_op`s, opaque to a compiled layer. The decode
blocks' widths and pipeline depths are timed on the card per shape before capture (`tuned`).

Example:
    >>> y = routed(x, w, idx, gate_up, None, down, None)   # x (T, D) cuda; gate_up (E, 2I, D)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..native.moe import _cdiv, align


@triton.jit
def _gate_up_act(x_ptr, w_ptr, b_ptr, h_ptr, ids_ptr, bexp_ptr, R, E, I, D, top_k, sx, swe, swn, swk, up_off,
                 sbe, sbn, b_up_off, sh, alpha, limit, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 IEEE: tl.constexpr, OSS: tl.constexpr, BIAS: tl.constexpr, GATHER: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if GATHER:  # one routed row a block: bexp is idx itself, block m is row m
        ids = tl.where(tl.arange(0, BM) == 0, pid_m, R)
    else:
        if e >= E:  # past the last expert's rows
            return
        ids = tl.load(ids_ptr + pid_m * BM + tl.arange(0, BM))  # (BM,) routed rows; R = padding
    valid = ids < R
    tok = (ids // top_k).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < I
    offs_k = tl.arange(0, BK)
    wg = w_ptr + e.to(tl.int64) * swe + offs_n[None, :].to(tl.int64) * swn  # gate column n
    wu = wg + up_off  # up column n
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + offs_k
        kmask = kk < D
        a = tl.load(x_ptr + tok[:, None] * sx + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        bm = kmask[:, None] & nmask[None, :]
        g = tl.load(wg + kk[:, None].to(tl.int64) * swk, mask=bm, other=0.0)  # (BK, BN)
        u = tl.load(wu + kk[:, None].to(tl.int64) * swk, mask=bm, other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
    if BIAS:
        bg = b_ptr + e.to(tl.int64) * sbe + offs_n * sbn
        acc_g += tl.load(bg, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bg + b_up_off, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if OSS:  # gpt_oss: clamped SwiGLU, (up + 1) * gate * sigmoid(alpha * gate)
        gc = tl.minimum(acc_g, limit)
        uc = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = (uc + 1.0) * (gc / (1.0 + tl.exp(-alpha * gc)))
    else:  # silu(gate) * up
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + ids[:, None].to(tl.int64) * sh + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


@triton.jit
def _down(h_ptr, w_ptr, b_ptr, rw_ptr, y_ptr, ids_ptr, bexp_ptr, R, E, N, K, sh, swe, swn, swk, sbe, sy,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, BIAS: tl.constexpr,
          GATHER: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if GATHER:
        ids = tl.where(tl.arange(0, BM) == 0, pid_m, R)
    else:
        if e >= E:
            return
        ids = tl.load(ids_ptr + pid_m * BM + tl.arange(0, BM))
    valid = ids < R
    rows = ids.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_k = tl.arange(0, BK)
    wd = w_ptr + e.to(tl.int64) * swe + offs_n[None, :].to(tl.int64) * swn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(h_ptr + rows[:, None] * sh + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wd + kk[:, None].to(tl.int64) * swk, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * sbe + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(rw_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] * sy + offs_n[None, :], acc, mask=valid[:, None] & nmask[None, :])


@triton.jit
def _route(l_ptr, w_ptr, idx_ptr, E, sl, K: tl.constexpr, BE: tl.constexpr, OSS: tl.constexpr, NORM: tl.constexpr):
    """One token's routing from its logits (E,): top-K ids by rank (ties: lower id first, as
    torch.topk), found by K rounds of argmax (one warp: shuffles, no shared-memory barrier); weights
    softmax-then-top-K (renormalised when NORM) or, gpt_oss, softmax of the top K."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BE)
    m = offs < E
    l = tl.load(l_ptr + t * sl + offs, mask=m, other=float("-inf")).to(tl.float32)
    rank = tl.full((BE,), K, tl.int32)  # K: not selected
    rest = l
    for i in tl.static_range(K):
        hit = offs == tl.argmax(rest, 0, tie_break_left=True)  # the largest remaining, lowest id on a tie
        rank = tl.where(hit, i, rank)
        rest = tl.where(hit, float("-inf"), rest)
    sel = m & (rank < K)
    if OSS:  # softmax over the K selected logits
        p = tl.where(sel, tl.exp(l - tl.max(l, 0)), 0.0)
        p = p / tl.sum(p, 0)
    else:  # softmax over all E in float32, the top K of it
        p = tl.where(m, tl.exp(l - tl.max(l, 0)), 0.0)
        p = p / tl.sum(p, 0)
        if NORM:
            p = p / tl.sum(tl.where(sel, p, 0.0), 0)
    tl.store(idx_ptr + t * K + rank, offs.to(tl.int64), mask=sel)
    tl.store(w_ptr + t * K + rank, p.to(w_ptr.dtype.element_ty), mask=sel)


def route_fused(logits: torch.Tensor, kind: str, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`native.moe.route` in one kernel (a program a token): same ids, same dtypes; the weights equal
    `route`'s up to the rounding of exp and of the sums (float32).

    Example:
        >>> w, idx = route_fused(torch.tensor([[0.0, 2.0, 1.0]], device="cuda"), "qwen3_moe", 2, True)  # doctest: +SKIP
    """
    T, E = logits.shape
    logits = logits.contiguous()
    oss = kind == "gpt_oss"
    w = torch.empty(T, top_k, dtype=torch.float32 if kind == "mixtral" else logits.dtype, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    _route[(T,)](logits, w, idx, E, logits.stride(0), K=top_k, BE=triton.next_power_of_2(E), OSS=oss,
                 NORM=norm and not oss, num_warps=1 if E <= 256 else 4)
    return w, idx


def _config(R: int, dtype: torch.dtype) -> dict:
    """Block sizes: decode (few rows an expert) reads weights in long K strips; prefill tiles squarer.
    float32 tiles are twice the bytes: half the K strip, so three stages fit in shared memory."""
    if R <= 512:
        return dict(BM=16, BN=32, BK=256 if dtype != torch.float32 else 128, num_warps=4, num_stages=3)
    return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)


# decode (a block per routed row), bf16/fp16: block widths and pipeline depths for each kernel (the
# `down` entry overrides the `[gate; up]` kernel's for `_down`). Same BM and BK, so the same sums in the
# same order: the choice changes the time (programs an SM, waves over the SMs), never the result. Chosen
# per shape by timing all of them (`tuned`) the first time a shape runs outside a graph capture: in the
# warm-up steps before capture. Three stages of [gate; up] tiles: one program an SM; two: two.
_GATE_UP = [dict(BN=32, num_stages=3), dict(BN=32, num_stages=2), dict(BN=16, num_stages=3)]
_DOWN = [dict(BN=32, num_stages=3), dict(BN=32, num_stages=2), dict(BN=16, num_stages=4), dict(BN=64, num_stages=2)]
DECODE_CONFIGS = [dict(BM=16, BK=256, num_warps=4, **g, down=d) for g in _GATE_UP for d in _DOWN]
_TUNED: dict = {}  # (R, E, I, D, dtype, oss, bias) -> the config `tuned` picked


def tuned(key: tuple, run, configs: list = DECODE_CONFIGS, reps: int = 10) -> dict:
    """The fastest of `configs` for `key`, remembered for the process: `run(cfg)` captured `reps`
    times in a CUDA graph (GPU time, not the launch cost a batch-1 call would otherwise measure) and
    the median of 5 replays. Under a capture (no sync allowed) an untimed key gets the first config;
    `FastRunner` and `SlotRunner` run each step twice before capturing it, so their keys are timed
    then, and nothing is compiled or timed after capture.

    Example:
        >>> cfg = tuned(("rows", 8), lambda cfg: routed(x, w, idx, gu, None, dn, None, cfg=cfg, gather=True))  # doctest: +SKIP
    """
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return configs[0]
    times = []
    for cfg in configs:
        for _ in range(2):
            run(cfg)  # compiles this config's kernels
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                run(cfg)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
        for i in range(5):
            ev[2 * i].record()
            g.replay()
            ev[2 * i + 1].record()
        torch.cuda.synchronize()
        times.append(sorted(ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(5))[2])
        del g
    _TUNED[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _TUNED[key]


def gathers(T: int, k: int, E: int) -> bool:
    """Whether T tokens' T k routed rows run ungrouped, a block per row (decode: no grouping kernels;
    an expert hit by two rows is read twice): one token, or at most E / 2 rows (about 80% of them
    then hit distinct experts)."""
    return T == 1 or 2 * T * k <= E


def routed(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, gate_up_b: torch.Tensor | None,
           down: torch.Tensor, down_b: torch.Tensor | None, oss: bool = False, alpha: float = 0.0,
           limit: float = 0.0, cfg: dict | None = None, gather: bool | None = None) -> torch.Tensor:
    """w[t, j] * down[e](act(gate[e] x[t]) * up[e] x[t]), e = idx[t, j]: (T k, D) float32, row t k + j
    (the caller sums the k rows of a token, inside its compiled graph).

    Rows layout (oss False): gate_up (E, 2I, D) rows `[gate; up]`, down (E, D, I), silu. gpt_oss layout:
    gate_up (E, D, 2I) columns interleaved `[g0, u0, g1, ...]`, down (E, I, D), biases (E, 2I) and
    (E, D), clamped SwiGLU with `alpha`, `limit`. Both read through their strides: whole rows are read
    fastest (gpt_oss after `SparseMoe.stack`: transposed views of row-major copies). `cfg`
    overrides the block sizes, `gather` the choice of `gathers` (benchmarks/moe_kernels.py).
    """
    T, D = x.shape
    k = idx.shape[1]
    E = gate_up.shape[0]
    x = x.contiguous()  # the weights are read through their strides (gpt_oss: transposed views)
    if oss:  # (E, D, 2I): column 2n gate n, 2n + 1 up n; down (E, I, D)
        I = gate_up.shape[2] // 2
        swn, swk, up_off = 2 * gate_up.stride(2), gate_up.stride(1), gate_up.stride(2)
        dwn, dwk = down.stride(2), down.stride(1)
    else:  # (E, 2I, D): row n gate n, row I + n up n; down (E, D, I)
        I = gate_up.shape[1] // 2
        swn, swk, up_off = gate_up.stride(1), gate_up.stride(2), I * gate_up.stride(1)
        dwn, dwk = down.stride(1), down.stride(2)
    R = T * k
    gather = gathers(T, k, E) if gather is None else gather
    if cfg is None and gather and x.is_cuda and x.dtype != torch.float32:
        key = (R, E, I, D, x.dtype, oss, gate_up_b is not None)
        cfg = tuned(key, lambda c: routed(x, w, idx, gate_up, gate_up_b, down, down_b, oss, alpha, limit, c, gather))
    cfg = cfg or _config(R, x.dtype)
    dcfg = {**cfg, **cfg.get("down", {})}  # `_down`'s blocks: the same but for any it names
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if gather:  # block m = routed row m of expert idx[m]: no grouping
        bexp = idx.reshape(-1).contiguous()
        ids, nb = bexp, R
    else:
        ids, bexp = align(idx, E, BM)
        nb = bexp.shape[0]
    ieee, bias = x.dtype == torch.float32, gate_up_b is not None
    gb = gate_up_b.contiguous() if bias else gate_up  # unused pointer when there is no bias
    db = down_b.contiguous() if bias else down
    h = torch.empty(R, I, dtype=x.dtype, device=x.device)
    _gate_up_act[(nb, _cdiv(I, BN))](
        x, gate_up, gb, h, ids, bexp, R, E, I, D, k, x.stride(0), gate_up.stride(0), swn, swk, up_off,
        gb.stride(0), 2 if oss else 1, 1 if oss else I, h.stride(0), float(alpha), float(limit),
        BM=BM, BN=BN, BK=BK, IEEE=ieee, OSS=oss, BIAS=bias, GATHER=gather, **launch)
    y = torch.empty(R, D, dtype=torch.float32, device=x.device)
    rw = w.reshape(-1).contiguous()  # read as float32 in the kernel
    _down[(nb, _cdiv(D, dcfg["BN"]))](
        h, down, db, rw, y, ids, bexp, R, E, D, I, h.stride(0), down.stride(0), dwn, dwk, db.stride(0), y.stride(0),
        BM=BM, BN=dcfg["BN"], BK=BK, IEEE=ieee, BIAS=bias, GATHER=gather, num_warps=dcfg["num_warps"],
        num_stages=dcfg["num_stages"])
    return y


@torch.library.custom_op("mlx_bridge::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                   gate_up_b: torch.Tensor | None, down: torch.Tensor, down_b: torch.Tensor | None, oss: bool,
                   alpha: float, limit: float) -> torch.Tensor:
    """`routed` as one op (opaque to torch.compile; its kernels are captured in the step's CUDA graph)."""
    return routed(x, w, idx, gate_up, gate_up_b, down, down_b, oss, alpha, limit)


@routed_experts.register_fake
def _(x, w, idx, gate_up, gate_up_b, down, down_b, oss, alpha, limit):
    return x.new_empty(idx.numel(), x.shape[1], dtype=torch.float32)


@torch.library.custom_op("mlx_bridge::route_topk", mutates_args=())
def route_topk(logits: torch.Tensor, kind: str, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_fused` as one op."""
    return route_fused(logits, kind, top_k, norm)


@route_topk.register_fake
def _(logits, kind, top_k, norm):
    T = logits.shape[0]
    w = logits.new_empty(T, top_k, dtype=torch.float32 if kind == "mixtral" else logits.dtype)
    return w, logits.new_empty(T, top_k, dtype=torch.long)
