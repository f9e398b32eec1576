"""Write a plan as one GGUF file (or gguf-split shards): metadata, vocabulary, tensors streamed.

Header and tensor infos are known up front (types picked by `TypePicker`, sizes from the shapes), so
tensors stream into the file in llama.cpp's order; a thread pool computes them a few steps ahead
(materialize in float32 -> layout -> quantize; numpy releases the GIL), memory bounded by the look-ahead.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from ..plan import Plan
from .archs import GgufArch
from .hparams import add_hparams, llama3_rope_freqs
from .tensors import GTensor, gguf_tensors, materialize
from .types import GGUF_TYPES, TypePicker, nbytes, quantize
from .vocab import Vocab

def write_gguf(plan: Plan, cfg: dict, ga: GgufArch, vocab: Vocab, tok_dir: Path, path: Path, gguf_type: str,
               name: str, split_bytes: int = 0, lookahead_bytes: int = 256 << 20, progress=None) -> list[Path]:
    """Write `path` (and its split shards when `split_bytes`); return the files written."""
    tensors = gguf_tensors(plan, ga, cfg)
    extra: list[tuple[str, np.ndarray]] = []
    if (cfg.get("rope_parameters") or {}).get("rope_type") == "llama3":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_freqs(cfg)))
    names = {t.name for t in tensors}
    picker = TypePicker(gguf_type, cfg["num_hidden_layers"], sum("attn_v." in n or "attn_qkv." in n for n in names),
                        cfg.get("num_local_experts") or cfg.get("num_experts") or 0, "output.weight" not in names)
    types = [picker.pick(t.name, t.shape) for t in tensors]
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ga.arch], split_max_size=split_bytes)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    add_hparams(w, cfg, ga, len(vocab.tokens))
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
    _stream(w, tensors, types, lookahead_bytes, progress)
    w.close()
    return files


SPLIT_BYTES = 16 << 20  # a tensor larger than this is quantized in row blocks on all workers


def _compute(t: GTensor, ty, qpool: ThreadPoolExecutor, workers: int) -> np.ndarray:
    """Materialize in float32, then quantize; a large tensor in row blocks in parallel (quantization
    works row by row, so the blocks' bytes laid end to end are the tensor's)."""
    x = materialize(t)
    rows = x.reshape(-1, x.shape[-1])
    if x.nbytes < SPLIT_BYTES or workers < 2:
        return quantize(x, ty)
    parts = np.array_split(rows, 2 * workers)
    return np.concatenate([np.ascontiguousarray(q).reshape(len(p), -1)
                           for p, q in zip(parts, qpool.map(lambda r: quantize(r, ty), parts))])


def _stream(w: gguf.GGUFWriter, tensors: list[GTensor], types: list, lookahead: int, progress) -> None:
    """Compute tensors on both cores a few ahead of the writer; write them in order."""
    workers = min(2, os.cpu_count() or 1)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool, \
            ThreadPoolExecutor(workers) as qpool:
        pending: deque = deque()
        todo = iter(zip(tensors, types))
        inflight = 0
        while True:
            while inflight < lookahead or not pending:
                nxt = next(todo, None)
                if nxt is None:
                    break
                size = 4 * int(np.prod(nxt[0].shape))
                pending.append((pool.submit(_compute, *nxt, qpool, workers), size))
                inflight += size
            if not pending:
                return
            fut, size = pending.popleft()
            data = fut.result()
            w.write_tensor_data(data)
            inflight -= size
            if progress is not None:
                progress(size)
