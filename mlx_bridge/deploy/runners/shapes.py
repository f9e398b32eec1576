"""The static shapes compiled runners step at, and how they compile.

A decode step is captured once per shape, so batch sizes and cache lengths are rounded up to a few
buckets: batches to 1, 2, 4, ... (`bucket`), cache lengths to powers of two >= 256 (`len_bucket`).
`FastRunner` (one cache per bucket) and `SlotRunner` (one pool, steps over its first B rows and S
positions) use the same buckets, the same inductor options, and capture each shape's step the same
way (`capture`).

Example:
    >>> bucket(3), len_bucket(385)
    (4, 512)
"""

from __future__ import annotations

import torch

MIN_LEN = 256
GROW_AHEAD = 256  # positions past the prompt allocated at first; the cache doubles when decoding needs more
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int, sizes=BATCHES) -> int:
    """The smallest bucket >= n (powers of two past the table).

    Example:
        >>> bucket(3), bucket(300)
        (4, 512)
    """
    for s in sizes:
        if s >= n:
            return s
    return 1 << (n - 1).bit_length()


def up(n: int, sizes) -> int | None:
    """The smallest of `sizes` >= n, or None (`bucket` without its powers of two past the table).

    Example:
        >>> up(3, (1, 4, 16)), up(17, (1, 4, 16))
        (4, None)
    """
    return next((s for s in sizes if s >= n), None)


def mixed_lanes(most: int) -> tuple[int, ...]:
    """The lane counts a mixed step is prepared for when it carries at most `most` prompt chunks:
    1, 4, 16, ... below `most`, and `most`.

    Example:
        >>> mixed_lanes(16), mixed_lanes(8), mixed_lanes(1)
        ((1, 4, 16), (1, 4, 8), (1,))
    """
    return tuple(sorted({*(4 ** i for i in range(8) if 4 ** i < most), most}))


def carried(ready: int, lanes: tuple[int, ...]) -> int:
    """How many of `ready` prompt chunks a mixed step carries, its lanes padded up to one of `lanes`:
    all of them (at most `lanes[-1]`) when they fill at least 3/4 of the lanes that hold them, else as
    many as the largest lane count they fill; the rest ride the next step.

    Padding costs: on an H200 (Llama-2-7B shape, bf16, batch 32 + n lanes of 128 tokens) a step takes
    6.7 / 13.4 / 42.3 ms at 1 / 4 / 16 lanes, so 4 lanes cost less a chunk than 1 from 3 chunks on,
    and 16 less than 4 from 13 on.

    Example:
        >>> [carried(k, (1, 4, 16)) for k in (1, 2, 3, 4, 9, 12, 13, 40)]
        [1, 1, 3, 4, 4, 12, 13, 16]
    """
    k = min(ready, lanes[-1])
    if k < 1:
        return 0
    hold = up(k, lanes)
    return k if 4 * k >= 3 * hold else max(n for n in lanes if n <= k)


def len_bucket(n: int, min_len: int = MIN_LEN) -> int:
    """Cache length for n positions: a power of two, at least `min_len`.

    Example:
        >>> len_bucket(10), len_bucket(385), len_bucket(10, min_len=4)
        (256, 512, 16)
    """
    return max(min_len, 1 << (n - 1).bit_length())


def capture(run, device: torch.device, pool, warm=None) -> "torch.cuda.CUDAGraph":
    """`run` captured in a CUDA graph on `device` (its memory from `pool`), after two warm-up runs
    (`warm`, default `run`) on a side stream: they compile and create cuBLAS handles outside the
    capture. The capture stream is one of `device` (torch's default capture stream lives on the first
    device used).

    Example:
        >>> g = capture(lambda: step(buf), torch.device("cuda"), pool)  # doctest: +SKIP
        >>> g.replay()                                                  # doctest: +SKIP
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            (warm or run)()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, stream=torch.cuda.Stream(device)):
        run()
    return g


INDUCTOR_OPTIONS = {
    # casts rounded as eager rounds them, so low-precision results match the eager path's
    "emulate_precision_casts": True,
    # tune the block sizes of the generated norm/rope/SiLU kernels (gpt-fast's setting): on an H200,
    # Llama-2-7B bf16 batch 1 went from 223.9 to 247.5 tok/s; compile of a bucket 8 s -> 20 s
    "coordinate_descent_tuning": True,
}
