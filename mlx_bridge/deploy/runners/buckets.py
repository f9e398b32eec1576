"""`FastRunner`'s bookkeeping: the layers each device runs, and the static buffers of each bucket.

A decode step is captured once per (batch, cache length) bucket (`shapes.bucket`, `len_bucket`), so
each bucket owns every tensor its graphs read and write (`State`): the KV caches, the next input token,
the position and padding of each pipeline stage, the hidden state handed from one device to the next,
the logits, the sampling settings and the tokens of the steps since the last host sync.

    split(devices, split_at)   the layers as segments, one per device (and per extra stage boundary)
    new_state(...)             a bucket's buffers, each on the device of the segment or layer using it
    move(old, new, B)          a bucket's rows handed over to a longer one (`FastRunner._room`)
    fetch(t)                   a small device tensor on its way to the host, read when asked

Example:
    >>> [s.layers for s in split(["cpu", "cpu", "cpu"], split_at=(2,))]
    [[0, 1], [2]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..native.layers import cache_shapes


@dataclass
class Segment:
    device: torch.device
    layers: list[int]


@dataclass
class State:
    """Static buffers of one (batch, cache length) bucket; the graphs read and write only these."""

    B: int
    S: int
    k: list
    v: list
    tok: torch.Tensor  # (B, 1) next input token, on the first device
    slot: list  # per segment (1,) int64
    pad: list  # per segment (B,) int64
    xin: list  # per segment: hidden state handed over from the previous device (None for the first)
    xout: list
    logits: torch.Tensor  # (B, V) model dtype, on the head device
    nxt: torch.Tensor  # (B,)
    hist: torch.Tensor  # (H, B) tokens of the steps since the last sync
    step: torch.Tensor  # (1,) index into hist
    temp: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    counter: torch.Tensor  # (1,) noise counter
    graphs: dict = field(default_factory=dict)  # mode -> [CUDAGraph per segment]


def split(devices: list, split_at: tuple[int, ...] = ()) -> list[Segment]:
    """Layers on `devices` (one per layer) as segments: a new one where the device changes or at a
    layer index in `split_at`."""
    segments: list[Segment] = []
    for i, d in enumerate(devices):
        if not segments or segments[-1].device != d or i in split_at:
            segments.append(Segment(d, []))
        segments[-1].layers.append(i)
    return segments


def new_state(args, B: int, S: int, segments: list[Segment], layer_devices: list, device: torch.device,
              head_device: torch.device, dtype: torch.dtype, hist: int) -> State:
    """The buffers of bucket (B, S) for a model of `args`: layer i's caches on `layer_devices[i]`, the
    input token on `device`, the head's outputs and sampling settings on `head_device`, `hist` steps'
    tokens between host syncs."""
    ks, vs = cache_shapes(args, B, S)
    k = [torch.zeros(ks, device=layer_devices[i], dtype=dtype) for i in range(args.num_layers)]
    v = [torch.zeros(vs, device=layer_devices[i], dtype=dtype) for i in range(args.num_layers)]
    long, hd, D = dict(dtype=torch.long), head_device, args.hidden_size
    return State(
        B, S, k, v, tok=torch.zeros(B, 1, device=device, **long),
        slot=[torch.zeros(1, device=s.device, **long) for s in segments],
        pad=[torch.zeros(B, device=s.device, **long) for s in segments],
        xin=[None] + [torch.zeros(B, 1, D, device=s.device, dtype=dtype) for s in segments[1:]],
        xout=[torch.zeros(B, 1, D, device=s.device, dtype=dtype) for s in segments[:-1]] + [None],
        logits=torch.zeros(B, args.vocab_size, device=hd, dtype=dtype),
        nxt=torch.zeros(B, device=hd, **long), hist=torch.zeros(hist, B, device=hd, **long),
        step=torch.zeros(1, device=hd, **long), temp=torch.zeros(B, device=hd),
        top_p=torch.ones(B, device=hd), top_k=torch.zeros(B, device=hd, **long),
        seed=torch.zeros(B, device=hd, **long), counter=torch.zeros(1, device=hd, **long))


def move(old: State, new: State, B: int) -> None:
    """Hand the rows of `old` over to the longer bucket `new` (same batch): caches, positions,
    padding (the spare rows past the B in use stay all padding), token, counters and settings."""
    for a, b in zip(old.k + old.v, new.k + new.v):
        b[:, :, :old.S].copy_(a)
    for a, b in zip(old.slot + old.pad, new.slot + new.pad):
        b.copy_(a)
    for p in new.pad:
        p[B:].fill_(new.S)
    for name in ("tok", "step", "temp", "top_p", "top_k", "seed", "counter"):
        getattr(new, name).copy_(getattr(old, name))


def fetch(t: torch.Tensor):
    """Start copying t (a small device tensor) to the host; a function that waits for the copy
    (and only it) and returns it as lists. CUDA: pinned memory, an event after the copy."""
    if t.device.type != "cuda":
        rows = t.tolist()
        return lambda: rows
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return lambda: (done.synchronize(), host.tolist())[1]
