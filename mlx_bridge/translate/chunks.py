"""An output tensor as a sequence of bounded chunks, each made into a reused buffer.

Most tensors of an export are one source tensor copied byte for byte, cast, or with its LoRA fused
(a linear, an embedding, one expert): those are made a block of rows at a time straight into a buffer
of at most `chunk_bytes` that the writer hands back once the chunk is written and hashed. The rows
are read with pread into a small scratch (or, when the source's hash is computed from them, into
a second buffer of the chunk, `raw`), fused in float32 blocks of `ROWS` rows that stay in the CPU
cache, rounded once, and scanned for NaN/Inf on the same bytes while they are hot: no full-size array
or temporary exists, and no fresh memory is touched after the first chunks. Other tensors (dequantized,
split, transposed, joined, DoRA) are made whole by `materialize` and cut into chunks by the writer.

Example:
    >>> chunks = split(item, 4 << 20)  # doctest: +SKIP
    >>> data, bad, src = make(chunks[0], np.empty(4 << 20, np.uint8))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import BridgeError
from ..formats import DTYPES
from ..formats.dtypes import count_nonfinite
from . import gemm
from .lora import fuse_rows, lora_factors
from .parts import Item

ROWS = 128  # rows fused at a time (fuse_lora's block): float32 temporaries of ROWS x cols stay in cache
SCAN = 256 << 10  # bytes read and scanned at a time in a copy


@dataclass
class Chunk:
    """Bytes [begin, end) of `item`'s output; `whole`: made by `materialize` (begin 0, end nbytes)."""

    item: Item
    begin: int
    end: int
    whole: bool = False
    rows: int = ROWS  # rows fused at a time
    factors: tuple[np.ndarray, np.ndarray] | None = None  # LoRA (left, right), shared by an item's chunks
    one_pass: bool = False  # the factors are `gemm.safe_factors` (fused with one BLAS call a block)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def last(self) -> bool:
        return self.end == self.item.nbytes


def _row_bytes(item: Item, itemsize: int) -> int:
    n = itemsize
    for s in item.shape[1:]:
        n *= s
    return n


def streamable(item: Item, chunk_bytes: int, rows: int = ROWS) -> bool:
    """Whether `item` is made chunk by chunk (one plain source tensor, copied, cast or LoRA-fused)."""
    if not item.plain or not item.shape or item.nbytes == 0:
        return False
    p = item.parts[0]
    if p.quant is not None or (p.lora is not None and (p.lora.m is not None or p.lora.kind == "stacked")):
        return False
    if item.is_copy:
        return True
    if p.lora is not None and len(item.shape) != 2:
        return False
    return block_bytes(item, rows) <= chunk_bytes


def block_bytes(item: Item, rows: int = ROWS) -> int:
    """Output bytes of `rows` rows of `item` (the least a chunk of a computed tensor holds)."""
    return rows * _row_bytes(item, DTYPES[item.dtype].itemsize)


def split(item: Item, chunk_bytes: int, rows: int = ROWS) -> list[Chunk]:
    """The chunks of `item`, in file order: byte ranges of a copy, blocks of whole rows (a multiple of
    `rows`, so a fuse is computed in the same row blocks as `fuse_lora`) otherwise, or the whole item."""
    n = item.nbytes
    if not streamable(item, chunk_bytes, rows):
        return [Chunk(item, 0, n, whole=True)]
    if item.is_copy:
        step = max(8, chunk_bytes // 8 * 8)
    else:
        row = _row_bytes(item, DTYPES[item.dtype].itemsize)
        step = row * max(rows, chunk_bytes // row // rows * rows)
    lo = item.parts[0].lora
    factors = lora_factors(lo.a.read(), lo.b.read(), lo.scale, lo.kind) if lo is not None else None
    if factors is not None:
        factors = (factors[0], np.ascontiguousarray(factors[1]))
    one_pass = factors is not None and gemm.safe_factors(*factors)
    return [Chunk(item, b, min(b + step, n), rows=rows, factors=factors, one_pass=one_pass) for b in range(0, n, step)]


_scratch = threading.local()


def _buffer(name: str, nbytes: int) -> np.ndarray:
    """A per-thread scratch buffer of at least `nbytes` (kept and reused)."""
    b = getattr(_scratch, name, None)
    if b is None or b.nbytes < nbytes:
        b = np.empty(nbytes, np.uint8)
        setattr(_scratch, name, b)
    return b[:nbytes]


def _pread(item: Item, into: np.ndarray, offset: int) -> None:
    """Fill `into` (uint8) from the item's source tensor, starting `offset` bytes into it."""
    src = item.parts[0].src
    off, n, _ = src.file.span(src.key, src.index)
    fd, view, got = src.file.fileno(), memoryview(into), 0
    while got < into.nbytes:
        k = os.preadv(fd, [view[got:]], off + offset + got)
        if k <= 0:
            raise BridgeError(f"{src.file.path}: tensor {src.key!r} is cut short (truncated file)")
        got += k


def source_span(chunk: Chunk) -> tuple[int, int]:
    """(file offset, byte count) of the source bytes `chunk` is made from (a streamable chunk)."""
    item = chunk.item
    src = item.parts[0].src
    off = src.file.span(src.key, src.index)[0]
    if item.is_copy:
        return off + chunk.begin, chunk.nbytes
    row_out = _row_bytes(item, DTYPES[item.dtype].itemsize)
    row_src = _row_bytes(item, DTYPES[item.src_dtype].itemsize)
    return off + chunk.begin // row_out * row_src, chunk.nbytes // row_out * row_src


def make(chunk: Chunk, buf: np.ndarray, raw: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Make `chunk` into `buf` (uint8, at least chunk.nbytes); return (its bytes, number of NaN/Inf, the
    source bytes read for it: `source_span(chunk)`, or None). A copy's source bytes are its bytes; a
    computed chunk's are kept in `raw` (uint8, at least the span's size) when given, else read a block
    at a time into a scratch and not returned."""
    item = chunk.item
    out = buf[: chunk.nbytes]
    out_dt = DTYPES[item.dtype]
    bad = 0
    if item.is_copy:
        for b in range(0, chunk.nbytes, SCAN):  # read and scan a cache-sized piece at a time
            piece = out[b: b + SCAN]
            _pread(item, piece, chunk.begin + b)
            bad += count_nonfinite(piece.view(out_dt.np))
        return out, bad, out
    src_dt = DTYPES[item.src_dtype]
    cols = _row_bytes(item, 1)
    row_out, row_src = cols * out_dt.itemsize, cols * src_dt.itemsize
    r0, r1 = chunk.begin // row_out, chunk.end // row_out
    w_out = out.view(out_dt.np).reshape(r1 - r0, *item.shape[1:])
    for i in range(r0, r1, chunk.rows):  # absolute row blocks, as fuse_lora's
        j = min(i + chunk.rows, r1)
        if raw is None:
            block_src = _buffer("src", (j - i) * row_src)
        else:  # the chunk's source rows stay in `raw` (hashed by the caller)
            block_src = raw[(i - r0) * row_src: (j - r0) * row_src]
        _pread(item, block_src, i * row_src)
        w = block_src.view(src_dt.np).reshape(j - i, *item.shape[1:])
        block = w_out[i - r0: j - r0]
        if chunk.factors is None:
            block[...] = w  # a cast, rounded as astype rounds
        else:
            left, right = chunk.factors
            fuse_rows(w, left[i:j], right, block, _buffer("f32", 2 * (j - i) * cols * 4).view(np.float32),
                      chunk.one_pass)
        bad += count_nonfinite(block)
    return out, bad, None if raw is None else raw[: (r1 - r0) * row_src]
