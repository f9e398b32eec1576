"""`FastRunner`: the native model's decode step on CUDA as one graph replay per token, no host sync.

The `base.Runner` interface (`start`, `next`, `logits`), plus `steps`, a whole decode loop
that keeps sampling on the device and copies tokens to the host once every `sync_every` steps, the
next `sync_every` steps already queued behind the copy.

How it is fast (gpt-fast's recipe on the package's own model class):
- fused projections: `fused.fuse` builds `[q; k; v]` and `[gate; up]` once at load time;
- static shapes: batch rounded up to a bucket (1, 2, 4, 8, ...; spare rows are inert), cache length
  to a power of two >= 256; each (batch, length) bucket has its own pre-allocated KV cache and step
  buffers (`buckets.State`). A request starts in the bucket of its prompt + 256 positions and moves
  to the next length bucket when it needs more (`_room`), so a step never attends over more than
  twice the positions in use, whatever `max_tokens` allows;
- torch.compile (inductor with coordinate-descent tuning, no max-autotune) of ONE decoder layer,
  reused by every layer (same shapes), plus the step's rope/mask prologue and the head; compiled
  once per bucket, never per request; in the decode layer the q/k norms, rope and cache writes are one
  Triton kernel (`rope_kernels`), and each layer hands the next its input already normalised;
- the whole step (embedding, layers, head, token choice, slot and counter updates) captured in a
  `torch.cuda.CUDAGraph` per bucket (one per device when layers are spread over GPUs, see
  `pipeline.place`) and replayed;
- prefill eager with SDPA (flash when there is no padding).

Greedy tokens are the eager path's: the functions compute what `Transformer.step` computes (the tests
compare them). MoE layers are fused and compiled too; their experts run as one routed op that reads
only the selected experts (`moe_kernels`, Triton).

Example:
    >>> from mlx_bridge.deploy.runners.fast import FastRunner               # doctest: +SKIP
    >>> runner = FastRunner(model.module)                            # doctest: +SKIP
    >>> for toks in runner.steps(tokens, pad, 64): ...               # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Iterator

import torch

from ...errors import BridgeError
from . import fused as fm
from .buckets import Segment, State, fetch, move, new_state, split
from .sampling import greedy, pick
from ..native.layers import KVCache
from ..native.model import Transformer, decode_step, prefill
from .shapes import GROW_AHEAD, INDUCTOR_OPTIONS, MIN_LEN, bucket, capture, len_bucket

def _compile(fn):
    """Inductor without max-autotune or its own CUDA graphs (the runner captures the step itself)."""
    return torch.compile(fn, dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)


class FastRunner:
    """Static-cache, graph-replayed decoding of a native `Transformer` (single or multi device).

    Args:
        module: a loaded `Transformer` (its q/k/v and gate/up weights become views of fused ones).
        compile: torch.compile the layer/prologue/head functions (default: on CUDA).
        graphs: capture each step as CUDA graphs (default: on CUDA).
        sync_every: tokens per host sync in `steps`.
        max_buckets: (batch, length) buckets kept alive (caches and graphs); the least recently
            used one is dropped beyond it and re-captured (not recompiled) when needed again.
        split_at: extra stage boundaries (layer indices) besides device changes; a stage hands its
            hidden state to the next one as it would across GPUs (tests the hand-over on one device).
        min_len, grow_ahead: the shortest cache length bucket (default MIN_LEN) and the positions past
            the prompt a request starts with (default GROW_AHEAD); small values let tests cross buckets
            in a few tokens.
    """

    def __init__(self, module: Transformer, *, compile: bool | None = None, graphs: bool | None = None,
                 sync_every: int = 8, max_buckets: int = 4, split_at: tuple[int, ...] = (),
                 min_len: int | None = None, grow_ahead: int | None = None):
        self.module, self.args = module, module.args
        self.min_len = MIN_LEN if min_len is None else min_len
        self.grow_ahead = GROW_AHEAD if grow_ahead is None else grow_ahead
        self.vocab_size = module.args.vocab_size
        try:
            self.fused = fm.fuse(module)
            devices = [l.device for l in self.fused.layers]
        except fm.NotFusable:
            self.fused = None
            devices = [p.device for p in (next(l.parameters()) for l in module.model.layers)]
        self.segments: list[Segment] = split(devices, split_at)
        if self.fused is None and len(self.segments) > 1:
            raise BridgeError(f"{self.args.model_type}: MoE layers on several devices are not supported; use one GPU")
        self.device = module.model.embed_tokens.weight.device
        self.head_device = self.fused.head.device if self.fused else self.device
        self.dtype = module.model.embed_tokens.weight.dtype
        cuda = all(s.device.type == "cuda" for s in self.segments)
        self.use_graphs = cuda if graphs is None else graphs
        if self.use_graphs and not cuda:
            raise BridgeError("graphs=True needs every layer on a CUDA device")
        self.use_compile = (cuda if compile is None else compile) and self.fused is not None
        self.sync_every, self.max_buckets = sync_every, max_buckets
        self.stats = {"captures": 0, "buckets": 0, "grown": 0}
        self._states: OrderedDict = OrderedDict()
        self._pools: dict = {}
        self._build_functions()

    # -- functions (compiled or not) ------------------------------------------------------------------

    def _build_functions(self) -> None:
        if self.fused is None:
            return
        spec = self.fused.spec
        self._prefill_layer = fm.make_layer(spec, decode=False)
        self._head = fm.make_head(spec)
        # the decode chain: each layer also returns its output under the next layer's input norm (the
        # final norm's for the last), computed in the layer's own graph after its residual add
        layer, head, rm = fm.make_layer(spec, decode=True), fm.make_head(spec, normed=True), fm.rope_masks
        first = fm.make_norm(spec)  # a segment's first input norm
        if self.use_compile:
            lim = torch._dynamo.config
            lim.recompile_limit = max(lim.recompile_limit, 64)
            lim.accumulated_recompile_limit = max(getattr(lim, "accumulated_recompile_limit", 256), 1024)
            layer, head, rm, first, self._pick = (_compile(fn) for fn in (layer, head, rm, first, pick))
        else:
            self._pick = pick
        self._decode_layer, self._decode_head, self._rope_masks, self._first_norm = layer, head, rm, first
        self._ropes = {d: [(inv.to(d), s) for inv, s in self.fused.ropes] for d in self.fused.devices}

    # -- buckets --------------------------------------------------------------------------------------

    def _state(self, B: int, S: int) -> State:
        key = (B, S)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        while len(self._states) >= self.max_buckets:
            self._states.popitem(last=False)
        lay = self.fused.layers if self.fused else None
        layer_devices = [lay[i].device if lay else self.device for i in range(self.args.num_layers)]
        st = new_state(self.args, B, S, self.segments, layer_devices, self.device, self.head_device, self.dtype,
                       max(self.sync_every, 1))
        self._states[key] = st
        self.stats["buckets"] += 1
        return st

    def _graphs(self, st: State, mode: str) -> None:
        """Compile (first time per shape) and capture the step of `st` for `mode` ("greedy"/"sample").

        The warm-up runs are real steps on the current state: they write keys/values at the current
        slot and the next (both rewritten by the replayed steps before any query can see them), then
        the small counters are restored, so capturing mid-request changes nothing.
        """
        if not self.use_graphs or mode in st.graphs:
            return
        small = [*st.slot, st.step, st.counter, st.tok]
        saved = [t.clone() for t in small]
        graphs = []
        for i, seg in enumerate(self.segments):
            with torch.cuda.device(seg.device):
                run = lambda i=i: self._run_segment(st, i, mode)  # noqa: E731
                graphs.append(capture(run, seg.device, self._pool(seg.device),
                                      warm=lambda run=run: (st.step.zero_(), run())))
        for t, v in zip(small, saved):
            t.copy_(v)
        st.graphs[mode] = graphs
        self.stats["captures"] += 1

    def _pool(self, device: torch.device):
        """The graph memory pool that every bucket's graphs on `device` share, with an anchor graph
        that keeps it alive: once the last graph using a pool is gone (a bucket given up by `_room` or
        evicted), capturing into it again trips an assert in the CUDA caching allocator."""
        if device not in self._pools:
            handle, anchor = torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph()
            x = torch.zeros(1, device=device)
            with torch.cuda.graph(anchor, pool=handle, stream=torch.cuda.Stream(device)):
                x.add_(1)
            self._pools[device] = (handle, anchor, x)
        return self._pools[device][0]

    # -- one decode step ------------------------------------------------------------------------------

    def _run_segment(self, st: State, i: int, mode: str) -> None:
        """Segment i of one decode step on the static buffers (what a graph captures)."""
        seg, last = self.segments[i], i == len(self.segments) - 1
        slot, pad = st.slot[i], st.pad[i]
        if self.fused is None:  # not fusable (deepseek_v3: latent attention): the module's own step over the cache
            logits = decode_step(self.module, KVCache(st.k, st.v), st.tok, slot, pad)
        else:
            f = self.fused
            x = fm.embed(f, st.tok) if i == 0 else st.xin[i]
            rot, ms = self._rope_masks(self._ropes[seg.device], slot, pad, st.S, f.windows, self.dtype,
                                       f.spec.softcap is None)
            lay = seg.layers
            h = self._first_norm(x, f.layers[lay[0]].w[0])
            for j, li in enumerate(lay):
                L = f.layers[li]
                nxt = f.layers[lay[j + 1]].w[0] if j + 1 < len(lay) else f.norm if last else None
                x = self._decode_layer(x, L.w, st.k[li], st.v[li], *rot[L.rope], ms[L.window], slot, h=h, nxt=nxt)
                if nxt is not None:
                    x, h = x
            if not last:
                st.xout[i].copy_(x)
                slot.add_(1)
                return
            logits = self._decode_head(h[:, -1], f.norm, f.head, f.head_bias)
        slot.add_(1)
        st.logits.copy_(logits)
        nxt = greedy(logits) if mode == "greedy" else self._pick(logits, st.temp, st.top_p, st.top_k, st.seed, st.counter)
        st.nxt.copy_(nxt)
        st.hist.index_copy_(0, st.step, nxt[None])
        st.step.add_(1)
        st.counter.add_(1)
        if len(self.segments) == 1:
            st.tok.copy_(nxt[:, None])

    def _step(self, st: State, mode: str) -> None:
        self._graphs(st, mode)
        n = len(self.segments)
        for i, seg in enumerate(self.segments):
            if self.use_graphs:
                with torch.cuda.device(seg.device):
                    st.graphs[mode][i].replay()
            else:
                self._run_segment(st, i, mode)
            if i + 1 < n:
                st.xin[i + 1].copy_(st.xout[i])
        if n > 1:
            st.tok.copy_(st.nxt[:, None])

    # -- prefill --------------------------------------------------------------------------------------

    def _prefill(self, st: State, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts (B, P) into rows [0, B) of the bucket's cache; logits (B, V)."""
        B, P = tokens.shape
        if self.fused is None:
            return prefill(self.module, KVCache([k[:B] for k in st.k], [v[:B] for v in st.v]), tokens, pad)
        return self._forward(tokens, pad, [(k[:B], v[:B]) for k, v in zip(st.k, st.v)])

    def _forward(self, tokens: torch.Tensor, pad: torch.Tensor | None, caches: list | None,
                 last_only: bool = True) -> torch.Tensor:
        """Fused forward of whole prompts (eager; any length): logits (B, V) of the last position,
        or (B, L, V) of all."""
        f, P = self.fused, tokens.shape[1]
        slots = torch.arange(P, device=tokens.device)
        padded = pad is not None and bool(pad.any())  # one host sync per prompt, not per token
        pad = pad if pad is not None else torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        x, per_dev = fm.embed(f, tokens), {}
        for li, L in enumerate(f.layers):
            d = L.device
            if d not in per_dev:
                s, p = slots.to(d), pad.to(d)
                rot = [fm.cos_sin(inv, sc, (s[None] - p[:, None]).clamp(min=0), self.dtype) for inv, sc in self._ropes[d]]
                ms = fm.masks(s, P, p if padded else None, f.windows) if padded or f.windows else {None: None}
                per_dev[d] = (s, rot, ms)
            s, rot, ms = per_dev[d]
            kc, vc = caches[li] if caches is not None else (None, None)
            x = self._prefill_layer(x.to(d), L.w, kc, vc, *rot[L.rope], ms[L.window], s)
        x = x.to(f.head.device)
        return self._head(x[:, -1] if last_only else x, f.norm, f.head, f.head_bias)

    # -- the runner interface -------------------------------------------------------------------------

    def _prepare(self, tokens: torch.Tensor, pad: torch.Tensor, max_len: int, mode: str) -> tuple[State, torch.Tensor]:
        B, P = tokens.shape
        if max_len > self.args.max_position_embeddings * 64:
            raise BridgeError(f"max_len {max_len}: far beyond the model's context")
        st = self._state(bucket(B), len_bucket(min(max_len, P + self.grow_ahead), self.min_len))
        self._slot, self._max_len = P, max_len
        spare = st.S  # spare rows: everything is padding, so each sees only its own current key
        for i, seg in enumerate(self.segments):
            st.slot[i].fill_(P)
            st.pad[i][:B].copy_(pad)
            st.pad[i][B:].fill_(spare)
        st.tok.zero_()
        st.step.zero_()
        st.counter.zero_()
        logits = self._prefill(st, tokens, pad)
        self._st, self._B, self._mode = st, B, mode
        return st, logits

    def _room(self, st: State, need: int) -> State:
        """The state whose cache holds `need` positions: `st`, or the next length bucket, which takes
        over the rows (caches and counters copied) while `st` is dropped (its memory goes to the new
        one). A long generation thus never attends over, or allocates, more than twice its length."""
        if need > self._max_len:
            raise BridgeError(f"decode step {need - 1}: past the cache length {self._max_len} given to start()")
        if need <= st.S:
            return st
        new = self._state(st.B, len_bucket(need, self.min_len))
        move(st, new, self._B)  # spare rows stay all padding
        self._states.pop((st.B, st.S), None)
        self._st = new
        self.stats["grown"] += 1
        return new

    def start(self, tokens: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor:
        """Prefill left-padded prompts (B, P) with left padding `pad` (B,); logits (B, V) float32."""
        with torch.inference_mode():
            return self._prepare(tokens, pad, max_len, "greedy")[1].float()

    def next(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step for tokens (B,); logits (B, V) float32 (a copy, safe to keep)."""
        B = self._B
        with torch.inference_mode():
            st = self._room(self._st, self._slot + 1)
            st.tok[:B, 0].copy_(token)
            st.step.zero_()
            self._step(st, self._mode)
            self._slot += 1
            return st.logits[:B].float()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) float32 of full sequences, no cache (the module's own forward)."""
        with torch.inference_mode():
            if len(self.segments) == 1:
                return self.module(input_ids).float()
            return self._forward(input_ids, None, None, last_only=False).float()

    def steps(self, tokens: torch.Tensor, pad: torch.Tensor, budget: int, *, temperature: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chunked: bool = False) -> Iterator:
        """Yield the next token of every row, `budget` times at most, deciding tokens on the device.

        The drop-in for `generation.token_chunks`' loop: tokens reach the host every `sync_every`
        steps, read while the next `sync_every` run (a consumer that stops early wastes at most twice
        that many steps); `chunked` yields each host sync's steps as one list. Greedy (temperature 0)
        gives the eager path's tokens; sampling draws from the same distribution as `sampling.sample`
        with its own random stream (reproducible for a seed).

        Example:
            >>> toks = list(runner.steps(tokens, pad, 16))        # doctest: +SKIP
        """
        B, P = tokens.shape
        mode = "greedy" if temperature == 0 else "sample"
        with torch.inference_mode():
            st, logits = self._prepare(tokens, pad, P + budget, mode)
            st.temp.fill_(float(temperature))
            st.top_p.fill_(float(top_p))
            st.top_k.fill_(int(top_k))
            st.seed.fill_(int(seed) if seed is not None else random.getrandbits(31))
            nxt = greedy(logits) if mode == "greedy" else pick(logits, st.temp[:B], st.top_p[:B], st.top_k[:B],
                                                                 st.seed[:B], st.counter)
            st.counter.fill_(1)
            st.tok[:B, 0].copy_(nxt.to(st.tok.device))
            first = nxt.tolist()
        yield [first] if chunked else first
        n, pending = 1, None
        while n < budget or pending is not None:
            ahead = None
            if n < budget:  # the next k steps go in before the last k are read: the device does not wait
                k = min(self.sync_every, budget - n)  # for the host's read and the graph launch after it
                with torch.inference_mode():
                    st = self._room(st, P + n + k - 1)  # these k steps write slots P+n-1 .. P+n+k-2
                    st.step.zero_()
                    for _ in range(k):
                        self._step(st, mode)
                    ahead = (fetch(st.hist[:k, :B]), P + n + k - 1)
                n += k
            if pending is not None:
                read, slot = pending
                rows = read()  # the one host sync of those k steps
                self._slot = slot
                if chunked:
                    yield rows
                else:
                    yield from rows
            pending = ahead

    def prepare(self, batch_sizes=(1,), max_lens=(MIN_LEN,), modes=("greedy",)) -> None:
        """Compile and capture buckets ahead of the first call (the server prepares its own
        continuous-batching steps: `slots.SlotRunner.prepare`).

        Example:
            >>> runner.prepare(batch_sizes=(1, 8), max_lens=(512, 2048))   # doctest: +SKIP
        """
        with torch.inference_mode():
            for b in batch_sizes:
                for n in max_lens:
                    st = self._state(bucket(b), len_bucket(n, self.min_len))
                    for m in modes:
                        self._graphs(st, m)
