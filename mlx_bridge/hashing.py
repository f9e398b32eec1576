"""How files are hashed: the one place that knows the algorithms, the recorded form and the checks.

A hash is recorded as `ALGORITHM:HEX` (the OCI digest form), so every value says how to check it:

    blake3:9f86d08188...   what this version writes (BLAKE3: about 4 GB/s a core, sha256 1.8)
    sha256:2cf24dba5f...   manifests of versions before it (schema 1 wrote bare hex: `manifest.migrate` tags it)

A check hashes the file with the algorithm its recorded value names, so old manifests keep being
checked byte for byte; a name this version does not know is refused with one line. Both hash objects
release the GIL on updates of 2 KB and more (CPython's HASHLIB_GIL_MINSIZE, blake3-py's GIL_MINSIZE),
so a hash thread runs beside the writer: `StreamHasher` for bytes as they are written, `translate.source_hash.SourceHasher` for the
source bytes an export reads.

Example:
    >>> h = Hasher(); _ = h.update(b"abc"); h.value()[:15]
    'blake3:6437b3ac'
    >>> algorithm("sha256:" + "0" * 64, "manifest.json: files['a']")
    'sha256'
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from .errors import BridgeError, raise_all

ALGORITHMS = {"blake3": blake3.blake3, "sha256": hashlib.sha256}  # name -> constructor (update, hexdigest)
DEFAULT = "blake3"  # what new manifests record
READ = 1 << 20  # bytes read at a time where a file is hashed from disk (one reused buffer)
_VALUE = re.compile(r"(?P<algo>[A-Za-z0-9_-]+):(?P<hex>[0-9a-f]+)")


class Hasher:
    """One running hash of `algo`; `value()` is its recorded form, `ALGORITHM:HEX`."""

    def __init__(self, algo: str = DEFAULT):
        if algo not in ALGORITHMS:
            raise BridgeError(f"unknown hash algorithm {algo!r} (this mlx-bridge knows {', '.join(ALGORITHMS)})")
        self.algo, self._h = algo, ALGORITHMS[algo]()
        self.update = self._h.update  # bound directly: a hash thread calls it per chunk

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def value(self) -> str:
        return f"{self.algo}:{self._h.hexdigest()}"


def algorithm(value, where: str) -> str:
    """The algorithm a recorded hash names; `where` (file and key) starts the error's one line.

    Raises:
        BridgeError: not `ALGORITHM:HEX`, or an algorithm this version does not know.
    """
    m = _VALUE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise BridgeError(f"{where}: {str(value)[:40]!r} is not a recorded hash (expected ALGORITHM:HEX, "
                          f"e.g. {DEFAULT}:...)")
    if m["algo"] not in ALGORITHMS:
        raise BridgeError(f"{where}: unknown hash algorithm {m['algo']!r} (this mlx-bridge knows "
                          f"{', '.join(ALGORITHMS)}); upgrade mlx-bridge or re-save the checkpoint")
    return m["algo"]


def file_digest(path: str | os.PathLike, algo: str = DEFAULT, chunk: int = READ, stop=None) -> Hasher | None:
    """The hash of a file, read into one reused buffer of `chunk` bytes; None if the event `stop` is
    set meanwhile (a refused export does not wait for the hashing of a large base)."""
    h = Hasher(algo)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                return None
            h.update(view[:n])
    return h


def hash_file(path: str | os.PathLike, algo: str = DEFAULT, chunk: int = READ, stop=None) -> str | None:
    """`ALGORITHM:HEX` of a file (None if `stop` was set meanwhile: see `file_digest`).

    Example:
        >>> import tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "a.bin"); _ = open(p, "wb").write(b"abc")
        >>> hash_file(p, "sha256", chunk=2) == "sha256:" + hashlib.sha256(b"abc").hexdigest()
        True
    """
    h = file_digest(path, algo, chunk, stop)
    return None if h is None else h.value()


def hash_like(path: str | os.PathLike, recorded: str, where: str) -> str:
    """The file's hash in the algorithm `recorded` names (to compare with it)."""
    return hash_file(path, algorithm(recorded, where))


def algorithm_of(values: dict[str, str], where: str) -> str:
    """The one algorithm a {name: recorded hash} section uses (DEFAULT when it is empty); a section
    that mixes algorithms is refused (no version writes one)."""
    algos = {algorithm(v, f"{where}[{k!r}]") for k, v in values.items()}
    if len(algos) > 1:
        raise BridgeError(f"{where}: mixes hash algorithms ({', '.join(sorted(algos))}); expected one")
    return algos.pop() if algos else DEFAULT


def check_hashes(directory: str | os.PathLike, files: dict[str, str], what: str = "manifest.json") -> dict[str, str]:
    """Refuse a directory whose files are not the bytes `files` ({name: recorded hash}) records, each
    checked with the algorithm it names; return `files` once checked (a caller need not hash them again).

    Raises:
        BridgeError: naming how many files changed or are missing and the first few.
    """
    d = Path(directory)
    problems = []
    for name, want in sorted(files.items()):
        p = d / name
        if Path(name).name != name:
            problems.append(f"{name}: not a plain file name")
        elif not p.is_file():
            problems.append(f"{name}: missing")
        elif hash_like(p, want, f"{d / what}: files[{name!r}]") != want:
            problems.append(f"{name}: changed since it was saved ({want.split(':')[0]} differs from {what})")
    raise_all(problems, str(d))
    return dict(files)


def bad_values(values, where: str) -> list[str]:
    """Problems with a {name: recorded hash} section of a manifest (for `manifest.validate`)."""
    if not isinstance(values, dict):
        return [f"{where} must be an object"]
    problems = []
    for k, v in values.items():
        try:
            algorithm(v, f"{where}[{k!r}]")
        except BridgeError as e:
            problems.append(str(e))
    return problems


class StreamHasher:
    """Hashes of files whose bytes are handed over in order as they are written: the updates run on
    one background thread (the hash releases the GIL), so hashing runs beside the writing and each
    byte is hashed while it is in memory anyway. At most `limit` bytes of owned buffers wait.

    Example:
        >>> h = StreamHasher("sha256")
        >>> _ = h.update("a", b"hello "), h.update("a", b"world")
        >>> h.digests()["a"] == "sha256:" + hashlib.sha256(b"hello world").hexdigest()
        True
    """

    def __init__(self, algo: str = DEFAULT, limit: int = 64 << 20):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hash-output")
        self._h: dict[str, Hasher] = {}
        self._pending: deque = deque()
        self._queued, self.limit, self.algo = 0, limit, algo

    def update(self, name: str, data: bytes | memoryview, owned: bool = True):
        """Add `data` to the hash of `name`; return the future that is done once it is hashed (the
        buffer may be reused then). `owned`: the buffer is held for the hasher alone (counted against
        `limit`); a reused buffer whose owner waits for the future is not."""
        mv = memoryview(data).cast("B")
        h = self._h.get(name) or self._h.setdefault(name, Hasher(self.algo))
        n = mv.nbytes if owned else 0
        fut = self._pool.submit(h.update, mv)
        self._pending.append((fut, n))
        self._queued += n
        while self._queued > self.limit or (self._pending and self._pending[0][0].done()):
            done, k = self._pending.popleft()
            done.result()
            self._queued -= k
        return fut

    def digests(self) -> dict[str, str]:
        """{name: recorded hash} once every update is done."""
        while self._pending:
            self._pending.popleft()[0].result()
        self._queued = 0
        return {k: h.value() for k, h in self._h.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
