"""GGUF tensors in row blocks, each computed from its own source rows, so a tensor of any size streams.

Every GGUF type we write quantizes row by row (blocks of 32 or 256 values within a row), so the bytes
of a tensor's row blocks laid end to end are the tensor's bytes; the per-tensor type depends on the
name and shape only. A block reads its source rows (pread), dequantizes and fuses the adapter on just
those rows (`parts.materialize(item, rows)`), then applies the GGUF layout (q/k row permutation within
whole heads, norm shift). Blocks start on multiples of `ROW_ALIGN` rows, `fuse_lora`'s row block, so
every matmul is the one the whole tensor runs and the bytes equal the unblocked export. Tensors whose
rows are not independent (a transposed source, parts joined along rows, a GTensor field this module
does not know) are computed whole.

Example:
    >>> [b.rows for b in row_blocks(t, max_bytes=64 << 20)]  # doctest: +SKIP
    [(0, 8192), (8192, 16384), (16384, 24576), (24576, 32000)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..parts import materialize as materialize_item
from .tensors import GTensor, materialize, permute_qk

ROW_ALIGN = 128  # translate/lora.fuse_lora's `rows`
KNOWN_FIELDS = {"name", "shape", "items", "n_head", "shift"}


@dataclass(frozen=True)
class Block:
    tensor: GTensor
    item: int | None = None  # which of the stacked items (experts); None: the whole tensor
    rows: tuple[int, int] | None = None  # rows r0:r1 of that item

    @property
    def nbytes(self) -> int:
        """float32 bytes of the block."""
        shape = self.tensor.shape if self.rows is None else (self.rows[1] - self.rows[0], *self.tensor.shape[-1:])
        return 4 * math.prod(shape)


def streamable(t: GTensor) -> bool:
    """Whether `t`'s rows can be computed apart: 2-D items whose rows come from single source rows."""
    if any(getattr(t, f.name) != f.default for f in dataclasses.fields(t) if f.name not in KNOWN_FIELDS):
        return False  # a layout step this module does not apply
    rows = t.items[0].shape[0]
    return (all(len(i.shape) == 2 and i.row_sliceable for i in t.items)
            and (not t.n_head or rows % t.n_head == 0))


def row_blocks(t: GTensor, max_bytes: int) -> list[Block]:
    """`t` as row blocks of at most `max_bytes` float32 (at least one aligned step), in file order."""
    if not streamable(t):
        return [Block(t)]
    n = t.items[0].shape[0]
    step = math.lcm(ROW_ALIGN, n // t.n_head) if t.n_head else ROW_ALIGN  # whole heads for the permutation
    per = max(step, max_bytes // (4 * t.shape[-1]) // step * step)
    return [Block(t, e, (r0, min(r0 + per, n))) for e in range(len(t.items)) for r0 in range(0, n, per)]


def materialize_block(b: Block) -> np.ndarray:
    """The float32 rows of block `b`, laid out for llama.cpp (as `tensors.materialize` lays out the whole)."""
    t = b.tensor
    if b.rows is None:
        return materialize(t)
    w = materialize_item(t.items[b.item], b.rows).astype(np.float32, copy=False)
    if t.n_head:
        w = permute_qk(w, t.n_head * w.shape[0] // t.items[0].shape[0])
    if t.shift:
        w = w + np.float32(t.shift)
    return w
