"""Continuous batching: a pool of KV-cache rows ("slots") that requests join and leave between steps.

`SlotRunner` holds one static cache of `rows` slots x `max_len` positions. A row's prompt is written
into a free slot in chunks (`prefill`), its first token chosen, and from the next decode step on it
decodes with every other running row (`launch`); when it ends its slot is `free`d for the next one.
Each slot keeps its own position, sampling settings (temperature, top-p, top-k, seed) and noise
counter on the device, so rows never pad to one another and a seeded row draws the same tokens
whatever its batch-mates (`sampling.pick` with per-row counters and row numbers).

A decode step runs over slots [0, B) for B the smallest batch size >= the highest busy slot + 1, and
attends over the first S positions, S the smallest length bucket (256, 512, ...) that holds every
busy row; free slots inside [0, B) are computed and ignored. On CUDA the step is the fast path's
(fused projections, its whole compiled layer `fused.make_layer` with each row's key written at its own
position, one CUDA graph per (B, S, greedy|sampled)); `prepare` compiles and captures every one of
them up front, so nothing compiles or captures while serving. Each compiled function has two graphs,
batch 1 and one for every other batch size (`compile_rows`: the batch dimension symbolic), not one
per batch size; the length bucket is symbolic too (the masks' last dimension), so compile work does
not grow with the length buckets either.

Prefill (`prefill.py`) takes the prompt chunks of up to 4 rows in one call (newcomers admitted together are
prefilled together; a long prompt a chunk at a time, between decode steps): the same fused functions,
not compiled (the matmuls dominate), each row's keys written at its own slot and offset, its queries
attending over its slot. On CUDA the call is one graph replay per (rows, chunk length, length bucket),
rows and lengths padded up to a prepared shape (padding lanes write a scratch slot, padded positions
go to a spare position past every bucket), all captured by `prepare` when the runner has no mixed
steps (with them the engine never calls `prefill`: a call captures its shape then). `prefill` and `launch`
return at once: the tokens reach the host when `Pending.tokens()` is called (`steps.py`), so the next step can be
launched before them.

Prompt chunks may instead ride on a decode step (`launch(..., chunks=...)`: a mixed step, `mixed.py`;
with no decode rows while none decodes), one forward pass for the decode rows and up to `mix` = (lanes,
tokens) of prompt, one graph per (B, S, greedy|sampled, lane count: 1, 4, 16, ... up to `lanes`, `mix_lanes`),
captured by `prepare` too.

`rows.RowRunner` gives the same interface over any runner with `start`/`next` (transformers models,
layers spread over GPUs): one cache per row and rows decoded one after another (correct, not fast).

Example:
    >>> r = SlotRunner(model.module, rows=8, max_len=1024)                     # doctest: +SKIP
    >>> r.prepare()                                                             # doctest: +SKIP
    >>> r.prefill([Chunk(0, prompt_ids, 0, RowSampling(temperature=0.0))]).tokens()  # doctest: +SKIP
    {0: 17}
    >>> r.launch([0], need=len(prompt_ids) + 1, greedy=True).tokens()             # doctest: +SKIP
    {0: 42}
"""

from __future__ import annotations

import copy
import time

import torch

from ...errors import BridgeError
from . import fused as fm
from .prefill import fits, launch_prefill, prefill_graph
from .sampling import pick
from .shapes import BATCHES, INDUCTOR_OPTIONS, MIN_LEN, capture, len_bucket, mixed_lanes, up
from .steps import Chunk, HostBuffers, Pending, Uploads, seed31
from ..native.model import Transformer

LANES = (1, 2, 4)  # rows one prefill call takes together (padded up to one of these on CUDA)
CHUNKS = (16, 64, 128, 256, 512, 1024, 2048)  # chunk lengths a prefill is padded up to on CUDA
MIX = (16, 128)  # (lanes, tokens) of the prompt chunks a mixed step carries at most by default (`mixed`)


def compile_rows(fn):
    """`fn` compiled for the decode step over a batch of rows: batch 1 gets its own static graph, and
    every other batch size one shared graph whose batch dimension is symbolic (dynamo's automatic
    dynamic shapes: a second size marks it dynamic; 0 and 1 stay specialised). Start-up thus compiles
    each function twice, not once per batch size (six times at `--max-batch 32`); each size is still
    captured in its own CUDA graph. Every other dimension stays static.

    Example:
        >>> qkv = compile_rows(fused.make_qkv(spec, rows=True))   # doctest: +SKIP
    """
    return torch.compile(fn, dynamic=None, fullgraph=True, options=INDUCTOR_OPTIONS)


def row_masks(pos: torch.Tensor, S: int, windows: list[int], additive: bool, dtype) -> dict:
    """window (None = full) -> mask (B, 1, 1, S) for one query per row at its position `pos` (B,):
    keys up to it (within the window); bool, or 0/-inf in `dtype` when `additive`."""
    k = torch.arange(S, device=pos.device)[None]  # [1, S]
    q = pos[:, None]  # [B, 1]
    seen = k <= q
    out = {}
    for w in [None, *windows]:
        m = (seen if w is None else seen & (q - k < w))[:, None, None]
        out[w] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) if additive else m
    return out


class SlotRunner:
    """Continuous-batching decode of a native `Transformer` on one device (see the module docstring).

    Args:
        module: a loaded native `Transformer` whose layers `fused.fuse` covers (else `RowRunner`).
        rows: slots in the pool (most rows decoding at once).
        max_len: most positions a row may use (prompt + new tokens).
        compile, graphs: torch.compile the layer halves / capture each step (default: on CUDA).
        batch_sizes: batch sizes a step may run at (default 1, 2, 4, ... up to `rows`).
        fused: the module's fused weights when a `FastRunner` has made them already (not twice).
        chunk: most prompt tokens one `prefill` call writes (its rows' chunks, padded, together).
        mix: (lanes, length) of the prompt chunks a mixed step carries beside the decode rows
            (`mixed`; `launch(chunks=...)`), or None: no mixed steps. On CUDA the chunks are padded
            up to a lane count of `mix_lanes` (1, 4, 16, ... up to `lanes`): a graph each per decode shape.
    Raises:
        fm.NotFusable: latent attention, or layers on several devices.
    """

    def __init__(self, module: Transformer, *, rows: int, max_len: int, compile: bool | None = None,
                 graphs: bool | None = None, batch_sizes: tuple[int, ...] | None = None, fused: fm.Fused | None = None,
                 chunk: int = 512, mix: tuple[int, int] | None = MIX):
        self.fused = f = fused or fm.fuse(module)
        if len(f.devices) > 1:
            raise fm.NotFusable("layers on several devices: continuous batching runs on one device")
        if f.spec.mla:
            raise fm.NotFusable("latent attention (deepseek_v3): its cache rows are not the layer halves' keys/values")
        self.module, self.args, self.vocab_size = module, module.args, module.args.vocab_size
        self.device, self.dtype = f.embed.device, f.embed.dtype
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if graphs is None else graphs
        self.use_compile = cuda if compile is None else compile
        self.padded = self.use_graphs  # prefill shapes padded up to prepared ones (graphs need them)
        self.rows, self.max_len = rows, max_len
        self.sizes = tuple(sorted({min(b, rows) for b in (batch_sizes or BATCHES)} | {rows}))
        S, self.lens = len_bucket(max_len), []
        while not self.lens or self.lens[-1] < S:
            self.lens.append(MIN_LEN if not self.lens else self.lens[-1] * 2)
        # prefill shapes: (lanes, chunk length), lanes * length <= chunk (one row may take a whole chunk)
        self.chunk = max(1, chunk)
        self.lanes = tuple(n for n in LANES if n <= rows)
        self.chunk_lens = tuple(sorted({c for c in CHUNKS if c < self.chunk} | {self.chunk}))
        self.mix = (min(mix[0], rows), mix[1]) if mix else None
        self.mix_lanes = mixed_lanes(self.mix[0]) if mix else ()
        # slot R is scratch: the padding lanes of a prefill write there; position S (past every bucket)
        # takes the writes of a chunk's padding tokens (never attended)
        a, dev, R = self.args, self.device, rows
        long = dict(dtype=torch.long, device=dev)
        with torch.inference_mode():
            self.k = [torch.zeros(R + 1, a.num_kv_heads, S + 1, a.head_dim, device=dev, dtype=self.dtype)
                      for _ in range(a.num_layers)]
            self.v = [torch.zeros_like(t) for t in self.k]
            self.tok, self.pos, self.active = (torch.zeros(R + 1, **long) for _ in range(3))
            self.top_k, self.seed, self.stream, self.counter, self.out = (torch.zeros(R + 1, **long) for _ in range(5))
            self.temp, self.top_p = torch.zeros(R + 1, device=dev), torch.ones(R + 1, device=dev)
            N, C = self.mix or (1, 1)
            self.first = torch.zeros(max(*self.lanes, N), **long)
            self._ar = torch.arange(max(self.chunk, max(self.lanes), S, rows + 1, C), **long)
            self._mbuf = torch.zeros(N, C + 4, **long)  # the mixed steps' lanes (the prefill layout)
            self._hosts = HostBuffers(R + 1 + max(N, *self.lanes), pinned=cuda, ready=8)  # launched steps' tokens
            # the captured prefills' and mixed steps' lanes on their way to the device
            self._prefill_in = Uploads(max(self.lanes) * (self.chunk + 4), pinned=cuda)
            self._mixed_in = Uploads(N * (C + 4), pinned=cuda)
        self.stats = {"captures": 0, "steps": 0, "prefills": 0, "mixed": 0}
        self._graphs: dict = {}
        self._pbufs: dict = {}  # (lanes, length) -> the prefill graphs' input (lanes, length + 4) on the device
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._ropes = [(inv.to(dev), s) for inv, s in f.ropes]
        spec, dtype = f.spec, self.dtype

        def rope(ropes, pos):
            return [fm.cos_sin(inv, s, pos[:, None], dtype) for inv, s in ropes]

        # prefill: the same functions uncompiled (eager kernels, captured in a graph on CUDA: matmuls dominate)
        self._pqkv, self._pout, self._phead = fm.make_qkv(spec), fm.make_out(spec), fm.make_head(spec)
        # the decode step: the fast path's whole layer (one graph for every layer; on CUDA q/k norms, rope
        # and cache writes in one kernel), each layer also giving its output under the next input norm
        fns = (fm.make_layer(spec, decode=True, rows=True), fm.make_norm(spec), fm.make_head(spec, normed=True), rope,
               pick)
        # the mixed step: the layer's halves around its split attention (`mixed`)
        halves = (fm.make_qkv(spec, rows=True), fm.make_out(spec), fm.make_head(spec)) if self.mix else ()
        if self.use_compile:
            fns, halves = tuple(map(compile_rows, fns)), tuple(map(compile_rows, halves))
        self._layer, self._first, self._dhead, self._rope, self._pick = fns
        self._qkv, self._out, self._head = halves or (None,) * 3

    # -- one decode step over slots [0, B), attending over S positions ----------------------------------

    def _run(self, B: int, S: int, mode: str) -> None:
        f, spec = self.fused, self.fused.spec
        pos, act = self.pos[:B], self.active[:B]
        x = fm.embed(f, self.tok[:B, None])  # [B, 1, D]
        rot = self._rope(self._ropes, pos)
        ms = row_masks(pos, S, f.windows, spec.softcap is None, self.dtype)  # {window: [B, 1, 1, S]}
        if self.use_compile:
            for m in ms.values():  # the length bucket symbolic from the first compile: one graph for every S
                torch._dynamo.maybe_mark_dynamic(m, 3)
        put = torch.where(act > 0, pos, self.k[0].shape[2] - 1)  # idle slots (one being prefilled among them) write
        # the spare position, never position 0 of a prompt
        ls = f.layers
        h = self._first(x, ls[0].w[0])
        for li, L in enumerate(ls):
            nxt = ls[li + 1].w[0] if li + 1 < len(ls) else f.norm
            x, h = self._layer(x, L.w, self.k[li][:B], self.v[li][:B], *rot[L.rope], ms[L.window], put, h=h, nxt=nxt)
        self._advance(self._dhead(h[:, -1], f.norm, f.head, f.head_bias), mode, self._pick)  # logits [B, V]

    def _advance(self, logits: torch.Tensor, mode: str, pick_fn) -> None:
        """Slots [0, B)'s next tokens from their logits (B, V) (greedy, or `pick_fn` with each row's
        settings) into `out` and `tok`; the active rows move one position on."""
        B = logits.shape[0]
        if mode == "greedy":
            nxt = logits.argmax(dim=-1)
        else:
            nxt = pick_fn(logits, self.temp[:B], self.top_p[:B], self.top_k[:B], self.seed[:B], self.counter[:B],
                          self.stream[:B])
        self.out[:B].copy_(nxt)
        self.tok[:B].copy_(nxt)
        self.pos[:B].add_(self.active[:B])
        self.counter[:B].add_(self.active[:B])

    def _graph(self, B: int, S: int, mode: str, mixed: int = 0):
        """The captured step for (B, S, mode) (a mixed step: with `mixed` lanes in `_mbuf`), compiling and
        capturing it the first time. The warm-up runs are real steps: the small per-row state is restored
        after them, and the keys they write (at each row's position and the next) are rewritten before
        any query can see them; the lanes are all padding then (the scratch slot)."""
        key = ("mixed", B, S, mode, mixed) if mixed else (B, S, mode)
        if key in self._graphs:
            return self._graphs[key]
        if mixed:
            from .mixed import mixed_run

            self._mbuf.zero_()
            self._mbuf[:, -4] = self.rows
            run = lambda: mixed_run(self, self._mbuf[:mixed], B, S, mode)  # noqa: E731
        else:
            run = lambda: self._run(B, S, mode)  # noqa: E731
        small = [self.tok, self.pos, self.counter, self.out, self.active]
        saved = [t.clone() for t in small]
        g = capture(run, self.device, self._pool)
        for t, v in zip(small, saved):
            t.copy_(v)
        self._graphs[key] = g
        self.stats["captures"] += 1
        return g

    def shape(self, top: int, need: int) -> tuple[int, int]:
        """(B, S) of a step whose highest busy slot is `top` and whose longest row needs `need` positions."""
        return next(b for b in self.sizes if b > top), self.length(need, "decode")

    def length(self, need: int, step: str) -> int:
        """The length bucket S of a `step` ("decode", "prefill") whose longest row needs `need` positions."""
        S = up(need, self.lens)
        if S is None or need > self.max_len:
            raise BridgeError(f"{step}: {need} positions needed, the pool holds {self.max_len}")
        return S

    def launch(self, slots: list[int], need: int, greedy: bool, chunks: list[Chunk] = ()) -> Pending:
        """One decode step for the busy `slots` (each row's next token), `need` the positions the
        longest of them uses after it; returns without waiting for the tokens. With `chunks` (as many
        as `mix_fits` takes) it is a mixed step: those prompt chunks ride on it (`mixed`), and the
        tokens include the first token of each row whose last chunk is among them.

        Example:
            >>> r.launch([0, 3], need=40, greedy=True).tokens()    # doctest: +SKIP
            {0: 17, 3: 5}
        """
        if chunks:
            from .mixed import launch_mixed

            return launch_mixed(self, slots, need, greedy, chunks)
        B, S = self.shape(max(slots), need)
        mode = "greedy" if greedy else "sample"
        with torch.inference_mode():
            if self.use_graphs:
                self._graph(B, S, mode).replay()
            else:
                self._run(B, S, mode)
            self.stats["steps"] += 1
            return self.pending({s: s for s in slots}, self.out)

    def pending(self, where: dict[int, int], *parts: torch.Tensor) -> Pending:
        """The `Pending` of a step just launched: `parts` (its token tensors on the device) copied one
        after another into a free host buffer, without waiting for the step on CUDA."""
        buf, n = self._hosts.take(), 0
        for p in parts:
            buf[n:n + len(p)].copy_(p, non_blocking=True)
            n += len(p)
        ev = None
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        return Pending(where, buf[:n], ev, lambda: self._hosts.give(buf))

    def mix_fits(self, lengths: list[int]) -> bool:
        """Whether one mixed step carries prompt chunks of these lengths (one lane each)."""
        return self.mix is not None and len(lengths) <= self.mix[0] and max(lengths, default=0) <= self.mix[1]

    def _set_sampling(self, chunks: list[Chunk]) -> None:
        """The sampling settings of the rows whose last chunk is among `chunks`, into their slots."""
        for ch in chunks:
            if ch.sampling is not None:
                sm, sl = ch.sampling, slice(ch.slot, ch.slot + 1)
                self.temp[sl].fill_(float(sm.temperature))
                self.top_p[sl].fill_(float(sm.top_p))
                self.top_k[sl].fill_(int(sm.top_k))
                self.seed[sl].fill_(seed31(sm.seed))
                self.stream[sl].fill_(int(sm.stream))

    def prepare(self) -> str:
        """Compile and capture every (batch size, length bucket, greedy|sampled) decode step before
        serving, then every mixed step (each lane count) when the runner has them, else every (rows, chunk
        length, length bucket) prefill call: with mixed steps the engine writes every prompt by them and
        never calls `prefill` (a call would capture its shape then). What was prepared, and how long each took.

        Example:
            >>> r.prepare()                                                 # doctest: +SKIP
            'decode: batch sizes [1, 2] x lengths [256] x greedy/sampled: 4 graphs (41.0 s); prefill: ...'
        """
        if not self.use_graphs:
            return "eager (no graphs to capture)"
        t = time.perf_counter()
        with torch.inference_mode():
            for B in self.sizes:
                for S in self.lens:
                    for mode in ("greedy", "sample"):
                        self._graph(B, S, mode)
            t1 = time.perf_counter()
            if self.mix:
                for B in self.sizes:
                    for S in self.lens:
                        for mode in ("greedy", "sample"):
                            for n in self.mix_lanes:
                                self._graph(B, S, mode, mixed=n)
            tm = time.perf_counter()
            shapes = [] if self.mix else [(n, c) for n in self.lanes for c in self.chunk_lens
                                          if n * c <= self.chunk or n == 1]
            for n, c in shapes:
                for S in self.lens:
                    prefill_graph(self, n, c, S)
            for x in (self.tok, self.pos, self.active, self.counter):
                x.zero_()
        t2 = time.perf_counter()
        decode = sum(1 for k in self._graphs if k[0] not in ("prefill", "mixed"))
        mixed = sum(1 for k in self._graphs if k[0] == "mixed")
        prompts = (f"mixed steps ({self.mix} lanes x tokens, lane counts {list(self.mix_lanes)}): {mixed} graphs "
                   f"({tm - t1:.1f} s)" if self.mix else
                   f"prefill: (rows, chunk) {shapes} x lengths {self.lens}: {len(self._graphs) - decode} graphs "
                   f"({t2 - tm:.1f} s)")
        return (f"decode: batch sizes {list(self.sizes)} x lengths {self.lens} x greedy/sampled: {decode} graphs "
                f"({t1 - t:.1f} s); {prompts}")

    # -- rows joining and leaving ------------------------------------------------------------------------

    def fits(self, lengths: list[int]) -> bool:
        """Whether one `prefill` call takes chunks of these lengths (rows and padded tokens within bounds)."""
        return fits(self, lengths)

    def prefill(self, chunks: list[Chunk]) -> Pending:
        """Write prompt chunks of up to `len(self.lanes)` rows in one call (`prefill.launch_prefill`) and
        choose the first token of each row whose last chunk this is; returns at once."""
        return launch_prefill(self, chunks)

    def free(self, slot: int) -> None:
        """The row in `slot` has ended: it stops advancing (it may still be computed, and ignored)."""
        with torch.inference_mode():
            self.active[slot] = 0
            self.pos[slot] = 0


def batch_runner(model, *, rows: int, max_len: int, batch_sizes: tuple[int, ...] | None = None, chunk: int = 512,
                 mix: tuple[int, int] | None = MIX):
    """The continuous-batching runner for a `DeployedModel`: a `SlotRunner` for a native model the
    fused path takes (dense or MoE) on one device (compiled and captured when the model runs the fast path), else a `RowRunner`
    (its rows one after another; one row at a time for layers spread over GPUs).

    Example:
        >>> batch_runner(load("deploy/alpaca"), rows=8, max_len=2048)   # doctest: +SKIP
        <...SlotRunner object at ...>
    """
    from .base import NativeRunner
    from .fast import FastRunner
    from .rows import RowRunner

    runner = model.runner
    fast = isinstance(runner, FastRunner)
    if model.backend == "native":
        try:
            return SlotRunner(model.module, rows=rows, max_len=max_len, compile=None if fast else False, graphs=None if fast else False,
                              batch_sizes=batch_sizes, fused=runner.fused if fast else None, chunk=chunk, mix=mix)
        except fm.NotFusable:
            pass
        if not fast or len(runner.segments) == 1:
            return RowRunner(lambda: NativeRunner(model.module), rows=rows, max_len=max_len, device=model.device,
                             vocab_size=runner.vocab_size)
        return RowRunner(lambda: runner, rows=1, max_len=max_len, device=model.device, vocab_size=runner.vocab_size)
    return RowRunner(lambda: copy.copy(runner), rows=rows, max_len=max_len, device=model.device,
                     vocab_size=runner.vocab_size)
