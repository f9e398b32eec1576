"""What an output tensor is made of: source tensors (`Ref`), dequantization (`Quant`), adapters (`Lora`),
the inverse of mlx-lm's sanitize per source (`Part`), and how parts join into one HF tensor (`Item`).

`materialize(item)` computes it: dequantize -> fuse adapter in float32 -> chunk / transpose / unshift ->
concatenate or interleave -> merge axes -> round once to the output dtype.

Example:
    >>> materialize(plan.items[0]).shape  # doctest: +SKIP
    (64, 64)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BridgeError
from ..formats import DTYPES, SafetensorsFile
from ..formats.dtypes import count_nonfinite
from .lora import fuse_dora, fuse_lora
from .quant import dequantize


@dataclass(frozen=True)
class Ref:
    """A source tensor, or its slice `[index]` along the first axis (one expert of a stacked tensor)."""

    file: SafetensorsFile
    key: str
    index: int | None = None

    def read(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.file.read(self.key, self.index, rows)

    def __str__(self) -> str:
        return f"{self.file.path.name}:{self.key}" + (f"[{self.index}]" if self.index is not None else "")


@dataclass(frozen=True)
class Quant:
    scales: Ref
    biases: Ref | None
    bits: int
    group_size: int
    mode: str

    def __str__(self) -> str:
        return f"dequantize({self.mode} {self.bits}-bit g{self.group_size})"


@dataclass(frozen=True)
class Lora:
    kind: str  # "linear" | "embedding" | "switch" (one expert) | "stacked" (all experts)
    a: Ref
    b: Ref
    scale: float
    m: Ref | None = None  # DoRA magnitude

    def __str__(self) -> str:
        return f"{'dora' if self.m is not None else 'lora'}({self.kind}, scale={self.scale:g}, {self.a.key[:-7]})"


@dataclass
class Part:
    """One MLX tensor's share of an output tensor: the tensor (or one expert of it), dequantized, its
    adapter fused, then the inverse of mlx-lm's sanitize: `chunk` (k-th of n equal pieces along an
    axis), `perm` (transpose) and `shift` (subtract the constant mlx-lm added)."""

    src: Ref
    src_dtype: str
    quant: Quant | None = None
    lora: Lora | None = None
    chunk: tuple[int, int, int] | None = None  # (axis, k, n)
    perm: tuple[int, ...] | None = None
    shift: float = 0.0
    zero: bool = False  # a tensor mlx-lm loads but does not compute with: written as the zeros MLX used
    reshape: tuple[int, ...] | None = None  # a one-element tensor with other axes in HF ((1,) <-> ())

    @property
    def plain(self) -> bool:
        return self.chunk is None and self.perm is None and not self.shift and not self.zero and self.reshape is None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The part's shape given its source tensor's (dequantized) shape."""
        if self.reshape is not None:
            return self.reshape
        s = list(shape[1:] if self.src.index is not None else shape)
        if self.chunk:
            s[self.chunk[0]] //= self.chunk[2]
        return tuple(s[i] for i in self.perm) if self.perm else tuple(s)

    @property
    def row_sliceable(self) -> bool:
        """Whether `compute(rows=...)` works: each output row comes from one source row (no transpose)."""
        return self.perm is None and not self.zero and (self.lora is None or self.lora.kind != "stacked")

    def compute(self, out_dtype, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The part; with `rows` (r0, r1), only its rows r0:r1 (equal to `compute()[r0:r1]`, read and
        computed from those source rows only; needs `row_sliceable`)."""
        if self.zero:
            return np.zeros(self.src.file.info(self.src.key).shape, out_dtype)
        src_rows = rows
        if rows is not None and self.chunk and self.chunk[0] == 0:  # the k-th of n row ranges of the source
            _, k, n = self.chunk
            off = k * (self.src.file.info(self.src.key).shape[1 if self.src.index is not None else 0] // n)
            src_rows = (off + rows[0], off + rows[1])
        w = self.src.read(src_rows)
        exact = self.lora is not None or not self.plain
        if self.quant:
            q = self.quant
            w = dequantize(w, q.scales.read(src_rows), q.biases.read(src_rows) if q.biases else None, bits=q.bits,
                           group_size=q.group_size, mode=q.mode, out_dtype=np.float32 if exact else out_dtype)
        if self.lora:
            lo = self.lora
            a, b = lo.a.read(), lo.b.read()
            if src_rows is not None:  # the factor that holds the weight's rows, cut to them
                r0, r1 = src_rows
                a, b = (a[r0:r1], b) if lo.kind == "embedding" else (a, b[r0:r1]) if lo.kind == "switch" \
                    else (a, b[:, r0:r1])
            if lo.m is not None:
                m = lo.m.read()
                w = fuse_dora(w, a, b, lo.scale, m if src_rows is None else m[src_rows[0]:src_rows[1]])
            elif lo.kind == "stacked":  # every expert of a stacked weight read whole
                w = np.stack([fuse_lora(w[e], a[e], b[e], lo.scale, "switch") for e in range(w.shape[0])])
            else:
                w = fuse_lora(w, a, b, lo.scale, lo.kind, out_dtype=np.float32 if not self.plain else out_dtype)
        if self.chunk and not (rows is not None and self.chunk[0] == 0):
            ax, k, n = self.chunk
            size = w.shape[ax] // n
            w = np.take(w, np.arange(k * size, (k + 1) * size), axis=ax)
        if self.perm:
            w = np.transpose(w, self.perm)
        if self.shift:  # in float32, rounded once to the output dtype by the caller
            w = w.astype(np.float32) - np.float32(self.shift)
        if self.reshape is not None:
            w = np.reshape(w, self.reshape)
        return w

    def describe(self) -> str:
        ops = [str(self.src)]
        if self.src.index is not None:
            ops.append(f"unstack_experts[{self.src.index}]")
        if self.quant:
            ops.append(str(self.quant))
        if self.lora:
            ops.append(str(self.lora))
        if self.chunk:
            ops.append(f"chunk(axis {self.chunk[0]}, {self.chunk[1]} of {self.chunk[2]})")
        if self.perm:
            ops.append(f"transpose{tuple(self.perm)}")
        if self.shift:
            ops.append(f"unshift({self.shift:g})")
        if self.reshape is not None:
            ops.append(f"reshape{tuple(self.reshape)}")
        if self.zero:
            ops = [f"zeros (mlx-lm does not use {self.src})"]
        return " -> ".join(ops)


@dataclass
class Item:
    """One output (HF) tensor: its parts joined along `axis` ("concat" or "interleave") when several."""

    name: str  # output (HF) key
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    parts: list[Part]
    join: str | None = None
    axis: int = 0
    merge: int | None = None  # axes merge, merge+1 of the joined parts are one HF axis

    @property
    def src(self) -> Ref:
        return self.parts[0].src

    @property
    def src_dtype(self) -> str:
        return self.parts[0].src_dtype

    @property
    def quant(self) -> Quant | None:
        return self.parts[0].quant if len(self.parts) == 1 else None

    @property
    def lora(self) -> Lora | None:
        """The adapter of a plain one-part item (what PEFT can express)."""
        return self.parts[0].lora if self.plain else None

    @property
    def plain(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].plain and self.merge is None

    @property
    def row_sliceable(self) -> bool:
        """Whether `materialize(item, rows)` works: row-sliceable parts, joined along another axis."""
        return self.merge is None and (self.join is None or self.axis != 0) and all(p.row_sliceable for p in self.parts)

    @property
    def is_copy(self) -> bool:
        p = self.parts[0]
        return self.plain and p.quant is None and p.lora is None and self.dtype == p.src_dtype

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> str:
        ops = " + ".join(p.describe() for p in self.parts)
        if self.join:
            ops = f"{self.join}(axis {self.axis}: {ops})"
        if self.merge is not None:
            ops += f" -> merge(axes {self.merge}, {self.merge + 1})"
        if self.dtype != self.src_dtype or any(p.quant for p in self.parts):
            ops += f" -> cast({DTYPES[self.dtype].name})"
        return ("copy " if self.is_copy else "") + ops


def materialize(item: Item, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Compute one output tensor (dequantize -> fuse adapter in float32 -> inverse sanitize -> round once);
    with `rows` (r0, r1), its rows r0:r1 only, from those source rows (needs `item.row_sliceable`)."""
    out = DTYPES[item.dtype].np
    ws = [p.compute(out, rows) for p in item.parts]
    if item.join == "concat":
        w = np.concatenate(ws, axis=item.axis)
    elif item.join == "interleave":  # part j holds elements j, j+n, j+2n, ... along the axis
        w = np.stack(ws, axis=item.axis + 1)
        w = w.reshape(w.shape[: item.axis] + (-1,) + w.shape[item.axis + 2:])
    else:
        w = ws[0]
    if item.merge is not None:
        a = item.merge
        w = w.reshape(w.shape[:a] + (-1,) + w.shape[a + 2:])
    w = w.astype(out, copy=False)
    check_finite(item, w)
    return w


def check_finite(item: Item, w: np.ndarray) -> None:
    """Refuse an output tensor `w` with NaN/Inf values."""
    n = count_nonfinite(w)
    if n:
        raise nonfinite_error(item, n)


def nonfinite_error(item: Item, n: int) -> BridgeError:
    """The error for an output tensor with `n` NaN/Inf values (a damaged source, or a fused adapter that
    overflows the output dtype)."""
    why = "" if item.is_copy else f" after {' -> '.join(item.describe().split(' -> ')[1:])}"
    size = item.nbytes // DTYPES[item.dtype].itemsize
    return BridgeError(f"{item.src}: {n} of {size} values of {item.name} are NaN or Inf{why}")
