"""Mixed steps: the running rows' decode tokens and newcomers' prompt chunks in one forward pass.

vLLM's chunked prefill riding on the decode step. A decode step is memory-bound: every weight is
read for a few rows. A mixed step runs the B decode rows (slots [0, B), one token each) and up to
`lanes` prompt chunks of at most `length` tokens (rows being prefilled; a long prompt may take
several lanes, consecutive pieces of it) through the same projections and MLP, so the weights are
read once for both, and only attention is split:

    tokens   [B decode rows + lanes x length chunk tokens] as T = B + lanes * length rows of one token
    qkv, out the decode step's layer halves (compiled on CUDA, the batch dimension symbolic) over all
             T rows; qkv writes each token's key at (its slot, its position): ended or
             not-yet-decoding slots inside [0, B) and padding tokens write a scratch place (never read)
    attend   decode rows: the decode attention over [0, B)'s cache rows (as `SlotRunner._run`);
             each lane: causal by position over its own slot's first S positions (its earlier
             chunks and, in the same layer, the lanes before it that carry the same prompt); on
             CUDA one Triton kernel for every lane (`attn_kernels.lanes`) reads the rows in place,
             elsewhere SDPA over a copy of each lane's row
    head     the decode rows' next tokens, and the first token of each row whose last chunk this is

Shapes are static: one CUDA graph per (B, S, greedy|sampled, lane count of `r.mix_lanes`), captured by
`SlotRunner.prepare` with the other graphs (qkv compiles once more there, for its cache rows `at`;
the attention between the halves is eager, as in the decode step). The lanes' input is the prefill
buffer layout, (lanes, length + 4): tokens, slot, start, last index, last chunk?.

Example:
    >>> r = SlotRunner(model.module, rows=8, max_len=1024, mix=(4, 128))   # doctest: +SKIP
    >>> r.launch([0, 1], need=40, greedy=True, chunks=[Chunk(2, ids, 0, RowSampling())]).tokens()  # doctest: +SKIP
    {0: 17, 1: 5, 2: 318}
"""

from __future__ import annotations

import torch

from . import fused as fm
from ...errors import BridgeError
from .sampling import greedy, pick
from .slots import row_masks
from .shapes import up
from .steps import Chunk, Pending, lane_rows
from ..native.layers import attend


def launch_mixed(r, slots: list[int], need: int, greedy: bool, chunks: list[Chunk]) -> Pending:
    """`SlotRunner.launch` with `chunks`: the lanes padded up to a lane count of `r.mix_lanes`, one graph replay on CUDA."""
    if not r.mix_fits([len(c.tokens) for c in chunks]) or min(len(c.tokens) for c in chunks) < 1:
        raise BridgeError(f"mixed step: chunks of {[len(c.tokens) for c in chunks]} tokens "
                          f"(at most {r.mix} lanes x tokens)")
    B, S = r.shape(max(slots, default=0), max(need, *(c.start + len(c.tokens) for c in chunks)))  # no row: B = 1
    mode = "greedy" if greedy and all(c.sampling is None or c.sampling.greedy for c in chunks) else "sample"
    N, C = up(len(chunks), r.mix_lanes), r.mix[1]
    data = lane_rows(chunks, N, C, r.rows)
    off = r.rows + 1  # first tokens follow the decode tokens (out has rows + 1 entries)
    where = {s: s for s in slots}
    where.update({ch.slot: off + i for i, ch in enumerate(chunks) if ch.sampling is not None})
    with torch.inference_mode():
        r._set_sampling(chunks)
        r.stats["steps"] += 1
        r.stats["mixed"] += 1
        if not r.use_graphs:
            mixed_run(r, torch.tensor(data, dtype=torch.long, device=r.device), B, S, mode)
            return r.pending(where, r.out, r.first[:N])
        g = r._graph(B, S, mode, mixed=N)  # before the copy: capturing a new shape clears the lanes' buffer
        r._mixed_in.copy(data, r._mbuf[:N])
        g.replay()
        p = r.pending(where, r.out, r.first[:N])
        r._mixed_in.launched(p)
        return p


def mixed_run(r, buf: torch.Tensor, B: int, S: int, mode: str) -> None:
    """One mixed step of the `SlotRunner` r: decode over slots [0, B) and the prompt lanes `buf`
    (N, C + 4), every query attending over S positions. Writes `out[:B]` and `first[:N]`; advances
    the decode rows and starts the rows whose last chunk this is (as `prefill.prefill_run`)."""
    f, spec, R = r.fused, r.fused.spec, r.rows
    N, C = buf.shape[0], buf.shape[1] - 4
    spare = r.k[0].shape[2] - 1  # a position past every bucket: never attended
    toks, slot, start, last, fin = buf[:, :C], buf[:, C], buf[:, C + 1], buf[:, C + 2], buf[:, C + 3].bool()
    pos, act = r.pos[:B], r.active[:B]
    lpos = start[:, None] + r._ar[:C]  # [N, C]
    live = act > 0
    # where each token's key goes: (row of the cache, position)
    at = torch.cat([torch.where(live, r._ar[:B], R), slot[:, None].expand(N, C).reshape(-1)])
    put = torch.cat([torch.where(live, pos, spare),
                     torch.where(r._ar[:C] <= last[:, None], lpos, spare).reshape(-1)])
    allpos = torch.cat([pos, lpos.reshape(-1)])  # [T]
    x = fm.embed(f, torch.cat([r.tok[:B], toks.reshape(-1)])[:, None])  # [T, 1, D]
    rot = [fm.cos_sin(inv, sc, allpos[:, None], r.dtype) for inv, sc in r._ropes]
    dm = row_masks(pos, S, f.windows, spec.softcap is None, r.dtype)
    kernel = x.is_cuda and spec.hd <= fm.DECODE_KERNEL_MAX_HD  # the lanes read their rows in place
    if not kernel:
        d = lpos[:, :, None] - r._ar[:S]  # [N, C, S]
        lm = {w: ((d >= 0) if w is None else (d >= 0) & (d < w))[:, None] for w in [None, *f.windows]}
    for li, L in enumerate(f.layers):
        kc, vc = r.k[li], r.v[li]
        q, _, _ = r._qkv(x, L.w, kc, vc, *rot[L.rope], put, at=at)  # [T, H, 1, hd]; each key written at (at, put)
        od = fm._decode_attend(q[:B], kc[:B, :, :S], vc[:B, :, :S], dm[L.window], spec.scale, spec.softcap, L.w[10])
        if kernel:
            ol = torch.ops.mlx_bridge.lane_attention(q[B:], kc, vc, slot, start, S, spec.scale, L.window, spec.softcap,
                                                     L.w[10])  # [N * C, H, 1, hd]
        else:
            ql = q[B:, :, 0].reshape(N, C, *q.shape[1:2], q.shape[-1]).transpose(1, 2)  # [N, H, C, hd]
            ol = attend(ql, kc[:, :, :S].index_select(0, slot), vc[:, :, :S].index_select(0, slot), lm[L.window],
                        spec.scale, spec.softcap, L.w[10]).transpose(1, 2).reshape(N * C, ql.shape[1], 1, ql.shape[-1])
        o = torch.cat([od, ol])  # [T, H, 1, hd]
        x = r._out(x, o, L.w)
    rows = torch.cat([r._ar[:B], B + r._ar[:N] * C + last])
    logits = r._head(x[rows, -1], f.norm, f.head, f.head_bias)  # [B + N, V]
    r._advance(logits[:B], mode, pick)  # the decode rows
    zero = torch.zeros_like(slot)
    if mode == "greedy":  # every row and chunk greedy: what pick gives at temperature 0, without its sort
        first = greedy(logits[B:])
    else:
        first = pick(logits[B:], r.temp[slot], r.top_p[slot], r.top_k[slot], r.seed[slot], zero, r.stream[slot])
    r.first[:N].copy_(first)
    to = torch.where(fin, slot, R)  # lanes that do not end a prompt update the scratch slot (a slot may fill
    # several lanes: exactly one of them writes it)
    for t, val in ((r.tok, first), (r.pos, start + last + 1), (r.counter, zero + 1), (r.active, zero + 1)):
        t[to] = val

