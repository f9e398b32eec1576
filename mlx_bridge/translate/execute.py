"""Execute a plan: stream output tensors into safetensors shards.

Shards are assigned up front (greedy, in order, at most `shard_size` bytes each; a larger tensor gets
its own shard), so every header is known before the first byte. Tensors are made in bounded chunks
(`chunks.py`) on a thread pool a few steps ahead of the writer (numpy releases the GIL in its
kernels, so both cores work): read with pread (nothing stays mapped), computed where the plan says
so, and scanned for NaN/Inf. Each byte then passes through once: written, and handed to the shard's
hash (`hashing.StreamHasher`, its own thread) from the same buffer; the source bytes it was made
from go to the source file's hash (`source_hash.SourceHasher`, its own thread) where the file holds
them in this order. Each shard's size is reserved before its first byte (`fsutil.preallocate`).
Memory stays bounded by the look-ahead, and the buffers are reused.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import BridgeError
from ..formats import DTYPES, StreamWriter, TensorSpec
from ..hashing import StreamHasher
from .chunks import ROWS, block_bytes, make, source_span, split, streamable
from .parts import Item, materialize, nonfinite_error
from .source_hash import SourceHasher

INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 2 << 20  # bytes of one chunk, at least
MAX_CHUNK = 16 << 20  # bytes of one chunk at most (a block of rows wider than this: the tensor is made whole)
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
                  lookahead_bytes: int = 32 << 20, chunk_bytes: int = CHUNK_BYTES, progress: bool = True,
                  hasher: StreamHasher | None = None, rows: int = ROWS,
                  source_hasher: SourceHasher | None = None) -> dict[str, str]:
    """Write all items as shards + index into `out`; return {tensor name: file name}.

    Each tensor is made in chunks (`chunks.split`) on a thread pool, ahead of the writer by at most
    `lookahead_bytes`, into a fixed set of `chunk_bytes` buffers. The writer (this thread) writes each
    chunk and hands the same buffer to `hasher` (its own thread), so every output byte is scanned for
    NaN/Inf, written and hashed while it is in memory once; a buffer is reused once both are done.
    A tensor with NaN/Inf raises `BridgeError` (the caller's temporary directory is discarded).
    `rows`: rows of a weight fused at a time (float32 temporaries of rows x columns).
    `source_hasher`: handed the source bytes each chunk was made from, at their offsets, in file
    order where the output's order allows (the source's hash without a second read); a computed
    chunk's source rows then stay in a second buffer of the slot until hashed.
    """
    shards = assign_shards(items, parse_size(shard_size))
    names = shard_names(len(shards))
    weight_map = {it.name: name for shard, name in zip(shards, names) for it in shard}
    total = sum(it.nbytes for it in items)
    workers = workers or min(2, os.cpu_count() or 1)
    chunk_bytes = chunk_size(items, chunk_bytes, rows)
    todo = (c for it in items for c in split(it, chunk_bytes, rows))
    nbufs = max(4, lookahead_bytes // chunk_bytes)
    raw_bytes = 0
    if source_hasher is not None:
        source_hasher.expect(source_spans(items, chunk_bytes, rows))
        raw_bytes = _raw_bytes(items, chunk_bytes, rows)
    free: list[tuple[np.ndarray, np.ndarray | None]] = []  # slots (buffer, source rows) not in use
    made = 0  # slots allocated so far (at most nbufs)
    hashing: deque = deque()  # ([hash futures], slot) written, hashes pending
    pending: deque = deque()  # (chunk, future, slot or None) in file order
    inflight = 0  # bytes of whole tensors made ahead

    def reclaim(wait: bool) -> None:
        while hashing and (wait or all(f.done() for f in hashing[0][0])):
            futs, slot = hashing.popleft()
            for f in futs:
                f.result()
            if slot is not None:
                free.append(slot)
            wait = False

    # each worker's small LoRA matmuls on one BLAS thread: BLAS threads of two workers spinning on
    # two cores doubled the CPU time and made the wall time erratic (TinyLlama: write 1.0 s vs 1.9-5.8 s)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        nxt = next(todo, None)

        def refill() -> None:
            nonlocal nxt, made, inflight
            while nxt is not None:
                c = nxt
                if c.whole:
                    if pending and inflight + c.nbytes > lookahead_bytes:
                        return
                    fut, buf = pool.submit(materialize, c.item), None  # NaN/Inf checked in it
                    inflight += c.nbytes
                else:
                    reclaim(False)
                    if not free and made < nbufs:
                        free.append((np.empty(chunk_bytes, np.uint8), np.empty(raw_bytes, np.uint8) if raw_bytes else None))
                        made += 1
                    if not free:
                        if pending:
                            return  # write what is made first
                        reclaim(True)
                    buf = free.pop()
                    fut = pool.submit(make, c, *buf)
                pending.append((c, fut, buf))
                nxt = next(todo, None)

        try:
            writer, bad = None, 0
            shard_iter = iter(zip(shards, names))
            left_in_shard = 0
            refill()
            bar = _bar(total, progress)  # once the workers have chunks: tqdm's import (~20 ms) beside them
            while pending:
                c, fut, buf = pending.popleft()
                it = c.item
                if left_in_shard == 0:
                    if writer is not None:
                        writer.close()
                    shard, name = next(shard_iter)
                    writer = StreamWriter(out / name, [TensorSpec(i.name, i.dtype, i.shape) for i in shard],
                                          {"format": "pt"})
                    if hasher is not None:
                        hasher.update(name, writer.header)
                    left_in_shard = len(shard)
                if c.whole:
                    w = np.ascontiguousarray(fut.result()).reshape(-1).view(np.uint8)
                    inflight -= c.nbytes
                    for b in range(0, w.nbytes, chunk_bytes) if w.nbytes else [0]:
                        writer.write_part(it.name, w[b: b + chunk_bytes])
                        if hasher is not None:  # the hasher holds `w` until it is hashed (its own limit)
                            hasher.update(name, w[b: b + chunk_bytes])
                else:
                    data, n, src = fut.result()
                    bad += n
                    writer.write_part(it.name, data)
                    futs = [hasher.update(name, data, owned=False)] if hasher is not None else []
                    if source_hasher is not None and src is not None:
                        futs.append(source_hasher.feed(it.parts[0].src.file.path, source_span(c)[0], src))
                    hashing.append(([f for f in futs if f is not None], buf))
                    if c.last and bad:
                        raise nonfinite_error(it, bad)
                if c.last:
                    bad = 0
                    left_in_shard -= 1
                bar.update(c.nbytes)
                refill()
            if writer is not None:
                writer.close()
            bar.close()
        finally:
            for _, fut, _ in pending:
                fut.cancel()
            while hashing:  # no buffer is freed while a hash still reads it
                reclaim(True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def chunk_size(items: list[Item], chunk_bytes: int = CHUNK_BYTES, rows: int = ROWS) -> int:
    """The chunk size `write_weights` uses: at least `rows` rows of a computed tensor (up to 16 MB; wider
    ones are made whole)."""
    need = max((block_bytes(it, rows) for it in items if it.plain and it.shape), default=0)
    return max(chunk_bytes, min(need, MAX_CHUNK))


def source_spans(items: list[Item], chunk_bytes: int = CHUNK_BYTES, rows: int = ROWS) -> dict[Path, list[tuple[int, int]]]:
    """{source file: [(offset, nbytes)]}, in the order `write_weights` reads them, of the source bytes it
    reads chunk by chunk (what it can hand a `SourceHasher`)."""
    chunk_bytes = chunk_size(items, chunk_bytes, rows)
    spans: dict[Path, list[tuple[int, int]]] = {}
    for it in items:
        if streamable(it, chunk_bytes, rows):
            src = it.parts[0].src
            off, n, _ = src.file.span(src.key, src.index)
            spans.setdefault(src.file.path, []).append((off, n))
    return spans


def _raw_bytes(items: list[Item], chunk_bytes: int, rows: int) -> int:
    """Bytes of the source rows of the largest computed chunk (0 if every streamed tensor is a copy)."""
    ratio = max((DTYPES[it.src_dtype].itemsize / DTYPES[it.dtype].itemsize for it in items
                 if not it.is_copy and streamable(it, chunk_bytes, rows)), default=0)
    return math.ceil(chunk_bytes * ratio)


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
    if not hasattr(tqdm, "_lock"):  # a thread lock: tqdm's default also makes a multiprocessing lock (20-35 ms
        tqdm.set_lock(threading.RLock())  # of imports before the first chunk) for bars of forked processes
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", leave=False)
