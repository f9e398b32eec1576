"""Streaming safetensors I/O with full header validation, on numpy alone.

Reading memory-maps the file and hands out zero-copy numpy views or raw bytes; writing takes the
complete list of tensor specs first (so the header is known), then the bytes of each tensor in order,
so a shard is written while its tensors are produced and never held whole.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
optional "__metadata__" (str -> str), then the data region; offsets are relative to the data region.

Example:
    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> save_file({"a": np.arange(4, dtype=np.float32)}, p)
    >>> with SafetensorsFile(p) as f: f.keys(), f.get("a").tolist()
    (['a'], [0.0, 1.0, 2.0, 3.0])
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from ..errors import BridgeError
from ..fsutil import preallocate, regular_file
from .dtypes import DTYPES, from_numpy

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offset in the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns (tensors by name, metadata, offset of the data region). Raises `BridgeError` naming the file
    and the key for: a header length past the end, non-JSON, unknown dtype, bad shape, dtype x shape not
    matching the byte count, offsets out of range or overlapping.
    """
    path = regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BridgeError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise BridgeError(f"{path}: header length {n} is past the end of the file ({size} bytes): truncated or not safetensors")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BridgeError(f"{path}: header is not valid JSON ({e})") from e
    except RecursionError as e:  # a header nested thousands deep
        raise BridgeError(f"{path}: header is not valid JSON (nested too deeply)") from e
    if not isinstance(header, dict):
        raise BridgeError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BridgeError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise BridgeError(f"{where}: entry needs dtype, shape and data_offsets")
        dt = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dt is None:
            raise BridgeError(f"{where}: unknown dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise BridgeError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise BridgeError(f"{where}: bad data_offsets {offs!r}")
        b, en = offs
        if not 0 <= b <= en <= data_len:
            raise BridgeError(f"{where}: data_offsets {offs} out of range (data region is {data_len} bytes): truncated file?")
        if en - b != _numel(shape) * dt.itemsize:
            raise BridgeError(f"{where}: {e['dtype']} x {shape} needs {_numel(shape) * dt.itemsize} bytes, offsets give {en - b}")
        tensors[name] = TensorInfo(name, e["dtype"], tuple(shape), b, en)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise BridgeError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data region")
    return tensors, meta, 8 + n


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    Example:
        >>> with SafetensorsFile("model.safetensors") as f:  # doctest: +SKIP
        ...     w = f.get("model.norm.weight")        # zero-copy numpy view
        ...     raw = f.raw("model.norm.weight")      # the exact bytes
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata, self._data_start = read_header(self.path)
        self._fh = open(self.path, "rb")
        size = self.path.stat().st_size
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, exactly as stored (zero-copy)."""
        t = self.tensors[name]
        return memoryview(self._mm)[self._data_start + t.begin : self._data_start + t.end]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array (bf16 as ml_dtypes.bfloat16), memory-mapped."""
        t = self.tensors[name]
        return np.frombuffer(self.raw(name), dtype=DTYPES[t.dtype].np).reshape(t.shape)

    def span(self, name: str, index: int | None = None,
             rows: tuple[int, int] | None = None) -> tuple[int, int, tuple[int, ...]]:
        """(file offset, byte count, shape) of a tensor, or of `tensor[index]` along its first axis; with
        `rows` (r0, r1), of rows r0:r1 along the first axis of that."""
        t = self.tensors[name]
        off, n, shape = self._data_start + t.begin, t.nbytes, t.shape
        if index is not None:
            if not 0 <= index < t.shape[0]:
                raise IndexError(f"{self.path}: {name}[{index}] out of range {t.shape}")
            n //= t.shape[0]
            off, shape = off + index * n, t.shape[1:]
        if rows is not None:
            r0, r1 = rows
            if not shape or not 0 <= r0 <= r1 <= shape[0]:
                raise IndexError(f"{self.path}: rows {r0}:{r1} of {name} out of range {shape}")
            per = n // shape[0] if shape[0] else 0
            off, n, shape = off + r0 * per, (r1 - r0) * per, (r1 - r0, *shape[1:])
        return off, n, shape

    def read(self, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A private copy of the tensor (or of `tensor[index]`, and of its rows r0:r1), read with pread:
        nothing stays mapped, so streaming a large model keeps the resident set small."""
        off, n, shape = self.span(name, index, rows)
        buf = np.empty(n, np.uint8)  # not zero-filled: every byte is read into it
        view = memoryview(buf)
        got = 0
        while got < n:
            k = os.preadv(self._fh.fileno(), [view[got:]], off + got)
            if k <= 0:
                raise BridgeError(f"{self.path}: tensor {name!r} is cut short (truncated file)")
            got += k
        return buf.view(DTYPES[self.tensors[name].dtype].np).reshape(shape)

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        # numpy views may still reference the map; let GC close it in that case
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to know about a tensor before its bytes exist."""

    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * DTYPES[self.dtype].itemsize


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors written in the order given."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % ALIGN)
    return struct.pack("<Q", len(blob)) + blob


class StreamWriter:
    """Write one safetensors file tensor by tensor, in the order of `specs`.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "y.safetensors")
        >>> with StreamWriter(p, [TensorSpec("w", "F32", (2,))]) as w:
        ...     w.write("w", np.ones(2, np.float32))
    """

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._part = 0  # bytes of the next tensor written by write_part
        self._f: BinaryIO = open(self.path, "wb")
        self.header = build_header(self.specs, metadata)  # the first bytes of the file
        try:
            preallocate(self._f.fileno(), len(self.header) + sum(s.nbytes for s in self.specs), self.path)
        except BaseException:
            self._f.close()
            raise
        self._f.write(self.header)

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if isinstance(data, np.ndarray):
            if from_numpy(data.dtype).st != spec.dtype or tuple(data.shape) != spec.shape:
                raise RuntimeError(f"{self.path}: {name}: got {data.dtype}{data.shape}, planned {spec.dtype}{spec.shape}")
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        if len(data) != spec.nbytes:
            raise RuntimeError(f"{self.path}: {name}: got {len(data)} bytes, planned {spec.nbytes}")
        self._f.write(data)
        self._next += 1

    def write_part(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Write the next bytes of tensor `name` (a tensor may come in several parts, in order; the next
        tensor starts once its planned byte count is reached)."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or name != spec.name:
            raise RuntimeError(f"{self.path}: expected tensor {spec and spec.name!r} next, got {name!r}")
        n = memoryview(data).nbytes
        if self._part + n > spec.nbytes:
            raise RuntimeError(f"{self.path}: {name}: {self._part + n} bytes, planned {spec.nbytes}")
        self._f.write(data)
        self._part += n
        if self._part == spec.nbytes:
            self._next += 1
            self._part = 0

    def copy_from(self, name: str, fd: int, offset: int, nbytes: int) -> None:
        """Write the next tensor by copying `nbytes` at `offset` of file descriptor `fd` (kernel copy
        where the OS has copy_file_range; no bytes pass through Python)."""
        spec = self.specs[self._next]
        if name != spec.name or nbytes != spec.nbytes:
            raise RuntimeError(f"{self.path}: expected {spec.name!r} ({spec.nbytes} bytes), got {name!r} ({nbytes})")
        self._f.flush()
        out = self._f.fileno()
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    k = os.copy_file_range(fd, out, nbytes - done, offset + done)
                    if k == 0:
                        break
                    done += k
            except OSError:  # e.g. across filesystems on old kernels: fall back to read/write
                pass
            os.lseek(out, 0, os.SEEK_END)
        chunk = 1 << 24
        while done < nbytes:
            b = os.pread(fd, min(chunk, nbytes - done), offset + done)
            if not b:
                raise BridgeError(f"source of {name!r} is cut short (truncated file)")
            self._f.write(b)
            done += len(b)
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            raise RuntimeError(f"{self.path}: closed before writing {missing[:5]}")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a dict of numpy arrays (insertion order) as one safetensors file."""
    specs = [TensorSpec(k, from_numpy(v.dtype).st, tuple(v.shape)) for k, v in tensors.items()]
    with StreamWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a whole safetensors file into numpy arrays (copies; for small files such as adapters)."""
    with SafetensorsFile(path) as f:
        return {k: np.array(f.get(k)) for k in f.keys()}
