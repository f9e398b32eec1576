"""The hashes of the source's weight files from the bytes the export reads anyway.

The export reads every byte of each tensor it copies, casts or fuses (`chunks.make`, with pread);
handed over here at their file offsets, in the writer's order, those bytes are hashed without being
read a second time. A hash is sequential, so a piece is hashed only where it continues the file from
where the hash stands. Bytes nothing will hand over (the header, tensors made whole or not exported)
are read here when the hash reaches them; a piece that comes ahead of its turn (the output's order is
not always the file's: `lm_head` is written first and stored last) is skipped, and what the hash has
not reached when the export is done is read from the file at the end. Where the orders agree each
byte is read once; the digest is the file's whatever the order.

Example:
    >>> import hashlib, os, tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.bin"; data = os.urandom(1000); _ = p.write_bytes(data)
    >>> h = SourceHasher([p], "sha256")
    >>> h.expect({p: [(100, 500), (800, 100)]})  # the spans the export will read
    >>> h.feed(p, 800, data[800:900]) is None  # ahead of its turn: read from the file at the end
    True
    >>> _ = h.feed(p, 100, data[100:600])  # the header [0, 100) is read, then this hashed
    >>> h.finish()[p].result() == "sha256:" + hashlib.sha256(data).hexdigest()
    True
    >>> h.close()
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import BridgeError
from ..hashing import DEFAULT, READ, Hasher


class _File:
    """One file's hash: `pos` is where it stands once every update submitted so far has run."""

    def __init__(self, path: Path, algo: str = DEFAULT):
        self.path, self.h, self.pos = path, Hasher(algo), 0
        self.spans: list[tuple[int, int]] = []  # (offset, nbytes) handed over (now, later or ahead of turn)
        self.starts: list[int] = []  # the spans merged: [starts[i], ends[i]) sorted, disjoint
        self.ends: list[int] = []

    def expect(self, spans: list[tuple[int, int]]) -> None:
        self.spans += spans
        merged: list[list[int]] = []
        for off, n in sorted(self.spans):
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + n)
            elif n > 0:
                merged.append([off, off + n])
        self.starts, self.ends = [a for a, _ in merged], [b for _, b in merged]

    def fed_between(self, a: int, b: int) -> bool:
        """Whether any byte in [a, b) is one that is handed over (now, later, or was, ahead of its turn)."""
        i = bisect.bisect_right(self.ends, a)
        return i < len(self.starts) and self.starts[i] < b

    def read(self, a: int, b: int | None, stop: threading.Event | None) -> bool:
        """Hash the file's bytes [a, b) (b None: to its end) read from disk; False if `stop` was set."""
        buf = bytearray(READ)
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(a)
            left = None if b is None else b - a
            while left is None or left > 0:
                if stop is not None and stop.is_set():
                    return False
                k = f.readinto(view if left is None or left >= READ else view[:left])
                if not k:
                    if left:
                        raise BridgeError(f"{self.path}: cut short while it was read (changed during the export)")
                    break
                self.h.update(view[:k])
                if left is not None:
                    left -= k
        return True


def fed_share(spans: list[tuple[int, int]], size: int) -> float:
    """The share of a file of `size` bytes that `SourceHasher` would hash from pieces handed over when
    the spans come in this order (the rest it reads itself): 1.0 when they come in file order, little
    when they come shuffled (MLX writes a file's tensors in hash-map order).

    Example:
        >>> fed_share([(0, 50), (50, 50)], 100), fed_share([(50, 50), (0, 50)], 100)
        (1.0, 0.5)
    """
    f = _File(Path())
    f.expect(list(spans))
    fed = 0
    for off, n in spans:
        end = off + n
        if end <= f.pos or (off > f.pos and f.fed_between(f.pos, off)):
            continue
        fed += end - max(off, f.pos)
        f.pos = end
    return fed / size if size else 1.0


class SourceHasher:
    """Hashes (`algo`) of the files at `paths`, computed on one background thread (the hash releases
    the GIL) from the pieces `feed` hands over, and from the files themselves for the rest."""

    def __init__(self, paths: list[Path], algo: str = DEFAULT):
        self._files = {Path(p): _File(Path(p), algo) for p in paths}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hash-source")

    @property
    def paths(self) -> list[Path]:
        return list(self._files)

    def expect(self, spans: dict[Path, list[tuple[int, int]]]) -> None:
        """Say which spans ({path: [(offset, nbytes)]}) will be handed over, before the first `feed`: a
        gap before a piece is read here only if none of its bytes will be."""
        for p, s in spans.items():
            if Path(p) in self._files:
                self._files[Path(p)].expect(list(s))

    def feed(self, path: Path, offset: int, data) -> Future | None:
        """Hand over the bytes of `path` at `offset`; return the future done once they are hashed (the
        buffer may be reused then), or None if they are not used (not this hasher's file, already
        hashed, or ahead of the hash: read from the file later)."""
        f = self._files.get(Path(path))
        if f is None:
            return None
        mv = memoryview(data).cast("B")
        end = offset + mv.nbytes
        if end <= f.pos:
            return None
        if offset > f.pos:
            if f.fed_between(f.pos, offset):  # bytes still to come (or skipped): wait for them
                return None
            self._pool.submit(f.read, f.pos, offset, None)  # bytes no one hands over (a header): read
            f.pos = offset
        fut = self._pool.submit(f.h.update, mv[f.pos - offset:])
        f.pos = end
        return fut

    def finish(self, stop: threading.Event | None = None) -> dict[Path, Future]:
        """{path: future recorded hash (None if `stop` was set meanwhile)}: what the hash has not reached is
        read from the file, after every piece handed over."""
        def rest(f: _File) -> str | None:
            return f.h.value() if f.read(f.pos, None, stop) else None

        return {p: self._pool.submit(rest, f) for p, f in self._files.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

