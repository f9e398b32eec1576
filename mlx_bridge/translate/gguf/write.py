"""Write a plan as one GGUF file (or gguf-split shards): metadata, vocabulary, tensors streamed.

Header and tensor infos are known up front (types picked by `TypePicker`, sizes from the shapes), so
tensors stream into the file in llama.cpp's order, in row blocks of at most 16 MB of float32 (`rows.py`):
a thread pool computes blocks a few ahead (read the source rows -> fuse in float32 -> layout ->
quantize; numpy and pread release the GIL), memory bounded by the look-ahead whatever a tensor's size.
The writer hashes each file (sha256, for the manifest) as it grows, while it waits on the workers.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from ...errors import BridgeError
from ..plan import Plan
from .archs import GgufArch
from .hparams import add_hparams, expert_count, llama3_rope_freqs
from .rows import Block, materialize_block, row_blocks
from .tensors import GTensor, gguf_tensors, mxfp4_source, scalar_hparams
from .types import GGUF_TYPES, TypePicker, nbytes, quantize
from .vocab import Vocab

BLOCK_BYTES = 16 << 20  # float32 bytes of a row block: the unit of work, whatever the tensor's size

def write_gguf(plan: Plan, cfg: dict, ga: GgufArch, vocab: Vocab, tok_dir: Path, path: Path, gguf_type: str,
               name: str, split_bytes: int = 0, lookahead_bytes: int = 128 << 20,
               progress=None) -> dict[Path, str]:
    """Write `path` (and its split shards when `split_bytes`); return {file written: its sha256}."""
    tensors = gguf_tensors(plan, ga, cfg)
    extra: list[tuple[str, np.ndarray]] = []
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type") == "llama3":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_freqs(cfg)))
    if rp.get("rope_type") == "longrope":  # MiniCPM3Model.generate_extra_tensors
        extra += [(gguf.TENSOR_NAMES[t] + ".weight", np.array(rp[k], dtype=np.float32)) for t, k in
                  ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))]
    types = tensor_types(tensors, ga, cfg, gguf_type)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ga.arch], split_max_size=split_bytes)
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
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, arr in extra:
        w.write_tensor_data(arr)
    sha = {f: _Sha256(p) for f, p in zip(w.fout, files)}  # gguf-py opens the shards in the order it names them
    try:
        _stream(w, tensors, types, lookahead_bytes, progress, BLOCK_BYTES, sha)
        w.close()
        return {p: h.finish() for p, h in zip(files, sha.values())}
    finally:
        for h in sha.values():
            h.close()


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


class _Sha256:
    """sha256 of a file as it is written: what is on disk so far is read back (page cache) and hashed
    while the writer waits on the workers, so the manifest needs no pass over the file at the end."""

    def __init__(self, path: Path):
        self.h, self.done, self.fd = hashlib.sha256(), 0, os.open(path, os.O_RDONLY)

    def follow(self, end: int) -> None:
        while self.done < end:
            b = os.pread(self.fd, min(end - self.done, 16 << 20), self.done)
            if not b:
                raise BridgeError(f"gguf: the file being written is shorter ({self.done} bytes) than written ({end})")
            self.h.update(b)
            self.done += len(b)

    def finish(self) -> str:
        self.follow(os.fstat(self.fd).st_size)
        return self.h.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


class _Blocks:
    """What `GGUFWriter.write_tensor_data` needs of a tensor (`nbytes`, `tofile`), its bytes written
    block by block as the workers finish them (and hashed between blocks)."""

    def __init__(self, nbytes: int, n_blocks: int, next_block, sha: dict):
        self.nbytes, self.n_blocks, self.next_block, self.sha = nbytes, n_blocks, next_block, sha

    def tofile(self, f) -> None:
        for _ in range(self.n_blocks):
            self.next_block().tofile(f)
            f.flush()
            self.sha[f].follow(f.tell())


def _stream(w: gguf.GGUFWriter, tensors: list[GTensor], types: list, lookahead: int, progress,
            block_bytes: int, sha: dict) -> None:
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
                w.write_tensor_data(_Blocks(nbytes(t.shape, ty), len(bs), next_block, sha))
        finally:
            for fut, _ in pending:
                fut.cancel()
