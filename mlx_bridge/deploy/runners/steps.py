"""What a slot pool's steps take and give: a row's sampling settings, its prompt chunks (as lanes,
`lane_rows`, on their way to the device through `Uploads`), and the tokens of a launched step on their
way to the host.

A step is launched without waiting for it (`SlotRunner.launch`, `prefill`): its tokens are copied
into a host buffer of `HostBuffers` and read when the worker asks (`Pending.tokens()`), after it has
launched the next step.

Example:
    >>> Chunk(slot=2, tokens=[5, 6, 7], start=0, sampling=RowSampling(temperature=0.7, seed=1)).sampling.greedy
    False
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSampling:
    """How one row chooses its tokens. `seed` None draws a random one; `stream` tells rows of one
    request (n > 1, several prompts) apart, so that they differ under one seed.

    Example:
        >>> RowSampling(temperature=0.7, top_p=0.9, seed=1).greedy
        False
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def seed31(seed: int | None) -> int:
    """A request's seed (any int64) folded to the 31 bits the device noise takes; None: a random one.

    Example:
        >>> seed31(7), seed31(2**40 + 7) != 7
        (7, True)
    """
    if seed is None:
        return random.getrandbits(31)
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return (s ^ (s >> 31) ^ (s >> 62)) & 0x7FFFFFFF


class Pending:
    """Tokens of a launched step, {slot: token}; `tokens()` waits for them (once; later calls give the
    same). `where` maps each slot to its entry of `out` (a decode step: the slot itself; a prefill: the
    row's lane); `release` is called once they are read (the host buffer goes back to its pool)."""

    def __init__(self, where: dict[int, int], out: torch.Tensor, event=None, release=None):
        self.where, self._out, self._event, self._release, self._got = where, out, event, release, None

    def tokens(self) -> dict[int, int]:
        if self._got is None:
            if self._event is not None:
                self._event.synchronize()
            got = self._out.tolist()
            self._got = {s: got[i] for s, i in self.where.items()}
            if self._release is not None:
                self._release()
        return self._got


class HostBuffers:
    """Host buffers that launched steps copy their tokens into (pinned on CUDA, so the copy does not
    wait), each taken until its `Pending` is read, then reused. The worker reads a round's tokens only
    after the next round's launches, and a round may launch several prefills: a fixed ring of two was
    overwritten before it was read (a row reported another row's first token). The pool grows to the
    launches outstanding at once and no further.

    Example:
        >>> pool = HostBuffers(4, pinned=False)
        >>> a, b = pool.take(), pool.take()
        >>> pool.give(a); pool.take() is a, len(pool)
        (True, 2)
    """

    def __init__(self, size: int, pinned: bool, ready: int = 0):
        self.size, self.pinned = size, pinned
        self._free = [self._new() for _ in range(ready)]
        self._made = ready

    def _new(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.long, pin_memory=self.pinned)

    def take(self) -> torch.Tensor:
        if self._free:
            return self._free.pop()
        self._made += 1
        return self._new()

    def give(self, buf: torch.Tensor) -> None:
        self._free.append(buf)

    def __len__(self) -> int:
        return self._made


class Uploads:
    """A ring of two host buffers (pinned on CUDA) that a captured step's input rows go through to its
    device buffer (`HostBuffers` is the other direction): `copy` waits for the launch two calls ago that
    read the same buffer (long done), fills the buffer's rows and starts one asynchronous copy;
    `launched` records the event of the step that reads them, after which the buffer may be filled again.

    Example:
        >>> ring, dst = Uploads(8, pinned=False), torch.zeros(2, 3, dtype=torch.long)
        >>> ring.copy([[1, 2, 3], [4, 5, 6]], dst); ring.launched(Pending({}, dst)); dst.tolist()
        [[1, 2, 3], [4, 5, 6]]
    """

    def __init__(self, size: int, pinned: bool):
        self._pin = [torch.zeros(size, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._done: list = [None, None]
        self._i = self._last = 0

    def copy(self, rows: list[list[int]], dst: torch.Tensor) -> None:
        """Start copying `rows` (as many as `dst` (N, W), contiguous, on the device) into `dst`."""
        i, self._i = self._i, self._i ^ 1
        self._last = i
        if self._done[i] is not None:
            self._done[i].synchronize()  # its copy two launches ago (long done)
        pin = self._pin[i][:dst.numel()].view(dst.shape)  # contiguous: one asynchronous copy
        pin.copy_(torch.tensor(rows, dtype=torch.long))
        dst.copy_(pin, non_blocking=True)

    def launched(self, p: Pending) -> None:
        """The step reading the last `copy` is launched as `p`: its buffer is free once `p`'s event is."""
        self._done[self._last] = p._event


def lane_rows(chunks: list[Chunk], N: int, C: int, scratch: int) -> list[list[int]]:
    """The lanes (N, C + 4) of a prefill or mixed step, one a chunk and padding lanes after them: C
    tokens (zero-padded), then slot, start, last index, last chunk?; padding lanes write `scratch`.

    Example:
        >>> lane_rows([Chunk(3, [7, 8], 5, RowSampling())], 2, 3, scratch=9)
        [[7, 8, 0, 3, 5, 1, 1], [0, 0, 0, 9, 0, 0, 0]]
    """
    rows = [[*ch.tokens, *[0] * (C - len(ch.tokens)), ch.slot, ch.start, len(ch.tokens) - 1,
             int(ch.sampling is not None)] for ch in chunks]
    return rows + [[0] * C + [scratch, 0, 0, 0]] * (N - len(chunks))


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of the row in `slot`, written at positions [start, start + len(tokens)); with
    `sampling` (the prompt's last chunk) the row's first token is chosen too.

    Example:
        >>> Chunk(slot=0, tokens=[1, 2, 3], start=0, sampling=RowSampling()).sampling.greedy
        True
    """

    slot: int
    tokens: list[int]
    start: int
    sampling: RowSampling | None = None

