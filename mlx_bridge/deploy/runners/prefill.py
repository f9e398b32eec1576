"""Prefill in a slot pool: prompt chunks of up to 4 rows written in one call, each row's keys at its own
slot and offset, and the first token of each row whose last chunk it is.

    lanes    (N, C + 4) on the device: per lane C tokens, then slot, start, last index, last chunk?
             (the mixed step's layout too); on CUDA rows and lengths padded up to a prepared shape
             (padding lanes write the scratch slot, padded positions the spare one past every bucket)
    layers   the fused functions uncompiled (the matmuls dominate): keys written at (slot, position),
             queries attending causally over their slot's first S positions
    head     the first token of each finished row (`sampling.pick` with the row's settings)

On CUDA one graph replay per (rows, chunk length, length bucket), all captured by `SlotRunner.prepare`.
`SlotRunner.prefill` and `fits` are these functions.

Example:
    >>> launch_prefill(r, [Chunk(2, ids, 0, RowSampling())]).tokens()   # doctest: +SKIP
    {2: 318}
"""

from __future__ import annotations

import torch

from . import fused as fm
from ...errors import BridgeError
from .sampling import pick
from .shapes import capture, up
from .steps import Chunk, Pending, lane_rows
from ..native.layers import attend


def fits(r, lengths: list[int]) -> bool:
    """Whether one `prefill` call takes chunks of these lengths (rows and padded tokens within bounds).

    Example:
        >>> r.fits([128, 128, 100]), r.fits([512, 1])          # doctest: +SKIP
        (True, False)
    """
    n, c = len(lengths), max(lengths)
    if not r.padded:
        return n <= r.lanes[-1] and (n == 1 or sum(lengths) <= r.chunk) and c <= r.chunk
    N, C = up(n, r.lanes), up(c, r.chunk_lens)
    return N is not None and C is not None and (N == 1 or N * C <= r.chunk)

def launch_prefill(r, chunks: list[Chunk]) -> Pending:
    """Write prompt chunks of up to `len(r.lanes)` rows in one call (one graph replay on CUDA;
    rows and lengths padded up to a prepared shape) and choose the first token of each row whose
    last chunk this is. Returns at once; `tokens()` gives {slot: first token} of those rows. The
    rows' next `launch` takes those tokens as input.

    Example:
        >>> r.prefill([Chunk(2, ids[:512], 0)])                                        # doctest: +SKIP
        >>> g = RowSampling()                                                         # doctest: +SKIP
        >>> r.prefill([Chunk(2, ids[512:], 512, g), Chunk(3, ids2, 0, g)]).tokens()   # doctest: +SKIP
        {2: 318, 3: 29871}
    """
    if not chunks or not fits(r, [len(c.tokens) for c in chunks]) or min(len(c.tokens) for c in chunks) < 1:
        raise BridgeError(f"prefill: {[len(c.tokens) for c in chunks]} tokens do not fit one call "
                          f"(at most {r.lanes[-1]} rows, {r.chunk} tokens)")
    n, c = len(chunks), max(len(c.tokens) for c in chunks)
    S = r.length(max(ch.start + len(ch.tokens) for ch in chunks), "prefill")
    N, C = (up(n, r.lanes), up(c, r.chunk_lens)) if r.padded else (n, c)
    data = lane_rows(chunks, N, C, r.rows)  # padding lanes: the scratch slot
    with torch.inference_mode():
        r._set_sampling(chunks)
        r.stats["prefills"] += 1
        where = {ch.slot: i for i, ch in enumerate(chunks) if ch.sampling is not None}
        if not r.use_graphs:
            prefill_run(r, torch.tensor(data, dtype=torch.long, device=r.device), N, C, S)
            return r.pending(where, r.first[:N])
        g, buf = prefill_graph(r, N, C, S)
        r._prefill_in.copy(data, buf)
        g.replay()
        p = r.pending(where, r.first[:N])
        r._prefill_in.launched(p)
        return p

def prefill_run(r, buf: torch.Tensor, N: int, C: int, S: int) -> None:
    """Prefill lanes `buf` (N, C + 4): per lane C tokens, then slot, start, last index, last chunk?
    Keys and values go to positions start + [0, C) of each slot; queries attend over S positions.
    Rows whose last chunk this is get their first token (`first`), position, counter, `active`."""
    f, spec = r.fused, r.fused.spec
    toks, slot, start, last, fin = buf[:, :C], buf[:, C], buf[:, C + 1], buf[:, C + 2], buf[:, C + 3].bool()
    pos = start[:, None] + r._ar[:C]  # [N, C]
    put = torch.where(r._ar[:C] <= last[:, None], pos, r.k[0].shape[2] - 1)  # padding -> the spare position
    x = fm.embed(f, toks)  # [N, C, D]
    rot = [fm.cos_sin(inv, sc, pos, r.dtype) for inv, sc in r._ropes]
    k = r._ar[:S]
    d = pos[:, :, None] - k  # [N, C, S]
    ms = {w: ((d >= 0) if w is None else (d >= 0) & (d < w))[:, None] for w in [None, *f.windows]}
    at = slot[:, None].expand(N, C)
    for li, L in enumerate(f.layers):
        kc, vc = r.k[li], r.v[li]
        q, kk, vv = r._pqkv(x, L.w, None, None, *rot[L.rope], None)  # [N, H, C, hd]
        kc[at, :, put] = kk.transpose(1, 2)
        vc[at, :, put] = vv.transpose(1, 2)
        o = attend(q, kc[:, :, :S].index_select(0, slot), vc[:, :, :S].index_select(0, slot), ms[L.window],
                   spec.scale, spec.softcap, L.w[10])
        x = r._pout(x, o, L.w)
    logits = r._phead(x[r._ar[:N], last], f.norm, f.head, f.head_bias)  # [N, V]
    zero = torch.zeros_like(slot)
    first = pick(logits, r.temp[slot], r.top_p[slot], r.top_k[slot], r.seed[slot], zero,
                 r.stream[slot])
    r.first[:N].copy_(first)
    done = ((r.tok, first), (r.pos, start + last + 1), (r.counter, zero + 1), (r.active, zero + 1))
    for t, v in done:
        t[slot] = torch.where(fin, v, t[slot])

def prefill_graph(r, N: int, C: int, S: int):
    """The captured prefill for (N rows, C tokens, S positions) and its input buffer; the warm-up
    and capture runs write only the scratch slot."""
    key = ("prefill", N, C, S)
    if (N, C) not in r._pbufs:
        buf = torch.zeros(N, C + 4, dtype=torch.long, device=r.device)
        buf[:, C] = r.rows
        r._pbufs[(N, C)] = buf
    buf = r._pbufs[(N, C)]
    if key not in r._graphs:
        buf.zero_()
        buf[:, C] = r.rows
        r._graphs[key] = capture(lambda: prefill_run(r, buf, N, C, S), r.device, r._pool)
        r.stats["captures"] += 1
    return r._graphs[key], buf
