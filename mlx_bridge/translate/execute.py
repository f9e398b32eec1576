"""Execute a plan: stream output tensors into safetensors shards.

Shards are assigned up front (greedy, in order, at most `shard_size` bytes each; a larger tensor gets
its own shard), so every header is known before the first byte. Every tensor is produced on a thread
pool a few steps ahead of the writer (numpy releases the GIL in its kernels, so both cores work): read
with pread (nothing stays mapped), computed where the plan says so, and checked for NaN/Inf. Each
byte then passes through once: written, and handed to the shard's sha256 (`fsutil.StreamHasher`,
its own thread). Memory stays bounded by the look-ahead.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import BridgeError
from ..formats import StreamWriter, TensorSpec
from ..fsutil import StreamHasher
from .parts import Item, materialize

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(s: str | int) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or an int (decimal units, as transformers' max_shard_size).

    Example:
        >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1000)
        (5000000000, 2147483648, 1000)
    """
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", s.upper())
    if not m or m.group(2) not in _UNITS:
        raise BridgeError(f"--shard-size {s!r}: expected a size like 5GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise BridgeError(f"--shard-size {s!r}: must be positive")
    return n


def assign_shards(items: list[Item], limit: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def shard_names(n: int, stem: str = "model") -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_weights(items: list[Item], out: Path, shard_size: int | str = "5GB", workers: int | None = None,
                  lookahead_bytes: int = 128 << 20, progress: bool = True,
                  hasher: StreamHasher | None = None) -> dict[str, str]:
    """Write all items as shards + index into `out`; return {tensor name: file name}.

    With `hasher`, every shard's bytes are handed to it in file order as they are written (computed
    tensors from memory, copied ones from the source's map), so its sha256 needs no second read.
    """
    shards = assign_shards(items, parse_size(shard_size))
    names = shard_names(len(shards))
    weight_map = {it.name: name for shard, name in zip(shards, names) for it in shard}
    total = sum(it.nbytes for it in items)
    workers = workers or min(2, os.cpu_count() or 1)
    bar = _bar(total, progress)
    # each worker's small LoRA matmuls on one BLAS thread: BLAS threads of two workers spinning on
    # two cores doubled the CPU time and made the wall time erratic (TinyLlama: write 1.0 s vs 1.9-5.8 s)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()  # (item, future or None) in write order
        queue = iter(items)
        inflight = 0

        def refill():
            nonlocal inflight
            while inflight < lookahead_bytes or not pending:
                it = next(queue, None)
                if it is None:
                    return
                fut = pool.submit(materialize, it)  # read (and computed), NaN/Inf checked
                inflight += it.nbytes
                pending.append((it, fut))

        writer = None
        shard_iter = iter(zip(shards, names))
        left_in_shard = 0
        refill()
        while pending:
            if left_in_shard == 0:
                if writer is not None:
                    writer.close()
                shard, name = next(shard_iter)
                writer = StreamWriter(out / name, [TensorSpec(i.name, i.dtype, i.shape) for i in shard],
                                      {"format": "pt"})
                if hasher is not None:
                    hasher.update(name, writer.header)
                left_in_shard = len(shard)
            it, fut = pending.popleft()
            w = fut.result()
            if not w.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar (1,))
                w = np.ascontiguousarray(w)
            writer.write(it.name, w)
            if hasher is not None:
                hasher.update(name, w.reshape(-1).view(np.uint8).data)
            inflight -= it.nbytes
            left_in_shard -= 1
            bar.update(it.nbytes)
            refill()
        if writer is not None:
            writer.close()
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def _bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", leave=False)
