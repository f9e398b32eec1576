"""Write a plan as one GGUF file (or gguf-split shards): metadata, vocabulary, tensors streamed.

Header and tensor infos are known up front (types picked by `TypePicker`, sizes from the shapes), so
tensors stream into the file in llama.cpp's order, in row blocks of about 4 MB of float32 (`rows.py`):
a thread pool computes blocks a few ahead (read the source rows -> fuse in float32 -> layout ->
quantize; numpy and pread release the GIL), memory bounded by the look-ahead whatever a tensor's size.
Each file's size is reserved before its tensor data (`fsutil.preallocate`: a full disk fails before the
data, and ext4 skips block allocation on every write), and its hash (for the manifest) is taken from
the bytes as they are handed to the file, not read back.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from ...errors import BridgeError
from ...fsutil import preallocate
from ...hashing import Hasher
from ..plan import Plan
from . import kvpack
from .archs import GgufArch
from .hparams import add_hparams, expert_count, llama3_rope_freqs
from .rows import Block, materialize_block, row_blocks
from .tensors import GTensor, gguf_tensors, mxfp4_source, scalar_hparams
from .types import GGUF_TYPES, TypePicker, nbytes, quantize
from .vocab import Vocab

# float32 bytes of a row block, the unit of work whatever the tensor's size (at least 128 rows). 16 MB blocks' arrays
# were each mapped and zeroed afresh (huge-page faults: 2.9 against 1.1 s of system time in a TinyLlama q8_0 export)
BLOCK_BYTES = 4 << 20

def write_gguf(plan: Plan, cfg: dict, ga: GgufArch, vocab: Vocab, tok_dir: Path, path: Path, gguf_type: str,
               name: str, split_bytes: int = 0, lookahead_bytes: int = 128 << 20,
               progress=None) -> dict[Path, str]:
    """Write `path` (and its split shards when `split_bytes`); return {file written: its hash}."""
    tensors = gguf_tensors(plan, ga, cfg)
    extra: list[tuple[str, np.ndarray]] = []
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type") == "llama3":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_freqs(cfg)))
    if rp.get("rope_type") == "longrope":  # MiniCPM3Model.generate_extra_tensors
        extra += [(gguf.TENSOR_NAMES[t] + ".weight", np.array(rp[k], dtype=np.float32)) for t, k in
                  ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))]
    types = tensor_types(tensors, ga, cfg, gguf_type)
    w = kvpack.Writer(path, gguf.MODEL_ARCH_NAMES[ga.arch], split_max_size=split_bytes)  # the vocabulary packed in bulk
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    add_hparams(w, cfg, ga, len(vocab.tokens))
    for method, values in scalar_hparams(plan, ga).items():
        getattr(w, method)(values)
    w.add_file_type(GGUF_TYPES[gguf_type][0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(w, tok_dir)
    for n, arr in extra:
        w.add_tensor_info(n, arr.shape, arr.dtype, arr.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    for t, ty in zip(tensors, types):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, ty), raw_dtype=ty)
    files = w.format_shard_names(path)
    w.open_output_file(path)
    w.fout = [_HashedFile(f, p) for f, p in zip(w.fout, files)]  # gguf-py opens the shards in the order it names them
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for f, infos in zip(w.fout, w.tensors):  # gguf-py pads before and after each tensor's data
            f.reserve(w.ggml_pad(f.tell(), w.data_alignment) + sum(w.ggml_pad(ti.nbytes, w.data_alignment)
                                                                   for ti in infos.values()) if infos else f.tell())
        for _, arr in extra:
            w.write_tensor_data(_Array(arr))
        _stream(w, tensors, types, lookahead_bytes, progress, BLOCK_BYTES)
        hashed = list(w.fout)
        for f in hashed:
            f.flush()
            f.check()
        return {p: f.h.value() for p, f in zip(files, hashed)}
    finally:
        w.close()


def tensor_types(tensors: list[GTensor], ga: GgufArch, cfg: dict, gguf_type: str) -> list[gguf.GGMLQuantizationType]:
    """The type of each tensor, in file order: llama.cpp's quantizer's pick, except MXFP4 for the experts of an
    `mxfp4_experts` arch whose values are all MXFP4 values of the source (exact in MXFP4, as llama.cpp's converter
    keeps them)."""
    picker = TypePicker.for_file(gguf_type, cfg, {t.name for t in tensors}, expert_count(cfg, ga))
    types = [picker.pick(t.name, t.shape) for t in tensors]
    return [gguf.GGMLQuantizationType.MXFP4 if ga.mxfp4_experts and "_exps.weight" in t.name and mxfp4_source(t) else ty
            for t, ty in zip(tensors, types)]


def _compute(b: Block, ty) -> np.ndarray:
    """One row block in float32 -> its bytes of type `ty`."""
    return quantize(materialize_block(b), ty)


class _HashedFile:
    """A file gguf-py writes (`write`, `tell`, `flush`, `close`) whose hash is taken from the bytes handed
    to `write`, so the manifest needs no pass over the file; `check` compares the size on disk at the end."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.h, self.size, self.reserved = f, path, Hasher(), 0, 0

    def write(self, b) -> int:
        self.h.update(b)
        self.size += memoryview(b).nbytes
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def reserve(self, nbytes: int) -> None:
        """Reserve the file's final size on disk (ENOSPC here names the file, before any tensor data)."""
        self.f.flush()
        self.reserved = nbytes
        preallocate(self.f.fileno(), nbytes, self.path)

    def check(self) -> None:
        """The file on disk has every byte hashed, and the size reserved (no allocated blocks past its end)."""
        on_disk = os.fstat(self.f.fileno()).st_size
        if on_disk != self.size or on_disk != self.reserved:
            raise BridgeError(f"{self.path}: {on_disk} bytes on disk, {self.size} written, {self.reserved} reserved")


class _Array:
    """A float tensor for `GGUFWriter.write_tensor_data` (`nbytes`, `tofile`) written through `_HashedFile`."""

    def __init__(self, arr: np.ndarray):
        self.arr = np.ascontiguousarray(arr)
        self.nbytes = self.arr.nbytes

    def tofile(self, f: _HashedFile) -> None:
        f.write(memoryview(self.arr).cast("B"))


class _Blocks:
    """What `GGUFWriter.write_tensor_data` needs of a tensor (`nbytes`, `tofile`), its bytes written
    block by block as the workers finish them."""

    def __init__(self, nbytes: int, n_blocks: int, next_block):
        self.nbytes, self.n_blocks, self.next_block = nbytes, n_blocks, next_block

    def tofile(self, f: _HashedFile) -> None:
        for _ in range(self.n_blocks):
            f.write(memoryview(np.ascontiguousarray(self.next_block())).cast("B"))


def _stream(w: gguf.GGUFWriter, tensors: list[GTensor], types: list, lookahead: int, progress,
            block_bytes: int) -> None:
    """Compute row blocks on both cores a few ahead of the writer (at most `lookahead` float32 bytes
    in flight); write them in order."""
    blocks = [row_blocks(t, block_bytes) for t in tensors]
    todo = iter([(b, ty) for bs, ty in zip(blocks, types) for b in bs])
    pending: deque = deque()
    inflight = 0

    def next_block() -> np.ndarray:
        nonlocal inflight
        while inflight < lookahead or not pending:
            nxt = next(todo, None)
            if nxt is None:
                break
            pending.append((pool.submit(_compute, *nxt), nxt[0].nbytes))
            inflight += nxt[0].nbytes
        fut, size = pending.popleft()
        data = fut.result()
        inflight -= size
        if progress is not None:
            progress(size)
        return data

    workers = min(2, os.cpu_count() or 1)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        try:
            for t, ty, bs in zip(tensors, types, blocks):
                w.write_tensor_data(_Blocks(nbytes(t.shape, ty), len(bs), next_block))
        finally:
            for fut, _ in pending:
                fut.cancel()
