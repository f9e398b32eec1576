"""Files: atomic output directories, crash recovery and permissions (hashing: `hashing.py`).

Everything the tool writes goes into a temporary directory beside the target and is renamed into
place at the end, so an interrupted run never leaves a half-written result under the final name:

    .NAME.tmp-PID@HOST-XXXX   being written (incomplete; removed by the next run once PID is gone)
    .NAME.new-PID@HOST        complete, about to replace NAME (`force`)
    .NAME.old-PID@HOST        the previous NAME, moved aside for that moment

A run is known to be gone only on its own host (HOST: this machine's name, `-` written `_`): on a
filesystem shared by several machines, side files of another host's runs are left alone, whatever
their PID means here.

Replacing an existing NAME takes three renames (tmp -> new, NAME -> old, new -> NAME); a run stopped
between them (kill -9, power loss) leaves a complete output under one of the side names, and the next
run on NAME (`recover`) puts it back and says so. Outputs get the permissions the umask gives (not
the 0700/0600 of `tempfile`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import BridgeError

# names without @HOST were written before the host was recorded; they count as this host's
_SIDE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9._]+))?(-[^/]*)?$")


def umask() -> int:
    """The process umask (read without a window where it is changed, where /proc allows).

    Example:
        >>> 0 <= umask() <= 0o777
        True
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def chmod_default(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the mode a plain `mkdir`/`open` would have under the umask (0777/0666 & ~umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def check_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing non-empty output directory unless `force`.

    Example:
        >>> check_output_dir("/nonexistent/fresh-dir")
        PosixPath('/nonexistent/fresh-dir')
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BridgeError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BridgeError(f"{out}: output directory exists and is not empty (use --force to overwrite)")
    return out


def check_apart(out: str | os.PathLike, source: str | os.PathLike, what: str = "the source") -> None:
    """Refuse an output directory equal to, inside or above `source` (replacing it would destroy it).

    Example:
        >>> check_apart("/data/models/base-hf", "/data/models/base")
        >>> check_apart("/data/models", "/data/models/base")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: --out /data/models contains the source /data/models/base; choose a directory apart from it
    """
    o, s = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if o == s:
        rel = "is"
    elif s in o.parents:
        rel = "is inside"
    elif o in s.parents:
        rel = "contains"
    else:
        return
    raise BridgeError(f"--out {out} {rel} {what} {source}; choose a directory apart from it")


def host() -> str:
    """This machine's name as side-file names carry it: characters other than letters, digits and `.`
    written `_` (a hostname has no `_`, so distinct hostnames stay distinct, and no `-`, so the name
    parses back).

    Example:
        >>> "-" not in host() and "@" not in host()
        True
    """
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def run_tag(pid: int | None = None, on: str | None = None) -> str:
    """`PID@HOST` of this run (or of `pid` on host `on`), as side-file names carry it.

    Example:
        >>> run_tag(42, "node1")
        '42@node1'
    """
    return f"{os.getpid() if pid is None else pid}@{host() if on is None else on}"


def side_name(out: str | os.PathLike, kind: str, pid: int | None = None, on: str | None = None) -> Path:
    """The side file of `out` of this run (or of run `pid` on host `on`): `.NAME.KIND-PID@HOST`, beside
    `out` (a `tmp` one gets a random suffix from `mkdtemp`).

    Example:
        >>> str(side_name("/data/out", "new", 42, "node1"))
        '/data/.out.new-42@node1'
    """
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{run_tag(pid, on)}"


def _gone(pid: str, on: str | None) -> bool:
    """Whether the run `pid` on host `on` (None: a name without a host, taken as this one) is known to
    have ended: only a run of this host can be; another host's is left to that host."""
    return (on is None or on == host()) and not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmtree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def recover(out: str | os.PathLike, log: Callable[[str], None] | None = None) -> str | None:
    """Clean up what stopped runs left beside `out`; put a complete output back under `out` if a run
    stopped in the middle of replacing it. Side files of live processes are left alone.

    Returns a sentence saying what was recovered (also passed to `log`), or None.

    Example:
        >>> recover("/nonexistent/out") is None
        True
    """
    out = Path(out)
    if not out.parent.is_dir():
        return None
    side: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    for p in out.parent.iterdir():
        m = _SIDE.match(p.name)
        if m is None or not _gone(m["pid"], m["host"]):
            continue
        if m["kind"] == "tmp" or m["name"] != out.name:  # incomplete, or another output's (left as it is)
            if m["kind"] == "tmp":
                _rmtree(p)
            continue
        side[m["kind"]].append(p)
    said = None
    if not out.exists() and (side["new"] or side["old"]):
        keep = (side["new"] or side["old"])[0]
        os.rename(keep, out)
        said = (f"{out}: a run stopped while replacing it; recovered the complete "
                f"{'new' if keep in side['new'] else 'previous'} output from {keep.name}")
    for p in side["new"] + side["old"]:
        if p.exists():
            _rmtree(p)
    if said and log is not None:
        log(said)
    return said


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory `PREFIX-PID@HOST-XXXX` in the system's temp dir, removed afterwards; those of
    this host's runs that died (kill -9) are removed first.

    Example:
        >>> with scratch_dir("mlx-bridge-doc") as d:
        ...     d.is_dir()
        True
    """
    root = Path(tempfile.gettempdir())
    for p in root.glob(f"{prefix}-*"):
        m = re.fullmatch(r"(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9._]+))?-[^/]*", p.name[len(prefix) + 1:])
        if m and _gone(m["pid"], m["host"]):
            _rmtree(p)
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}-{run_tag()}-", dir=root))
    try:
        yield d
    finally:
        _rmtree(d)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False,
               log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds.

    On an exception (Ctrl-C and SIGTERM included) the temporary directory is removed and `out` is left
    as it was. Without `force`, an `out` that another process filled meanwhile is not replaced.

    Example:
        >>> import tempfile, os
        >>> d = os.path.join(tempfile.mkdtemp(), "res")
        >>> with atomic_dir(d) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> sorted(os.listdir(d))
        ['a.txt']
    """
    out = Path(out)
    recover(out, log)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{side_name(out, 'tmp').name}-", dir=out.parent))
    try:
        chmod_default(tmp, directory=True)
        yield tmp
    except BaseException:
        _rmtree(tmp)
        raise
    try:
        if force and out.exists():
            _swap(tmp, out)
        else:
            os.rename(tmp, out)  # atomic; replaces only an empty directory
    except OSError as e:
        _rmtree(tmp)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise BridgeError(f"{out}: another run wrote it meanwhile; not replaced (use --force to overwrite)") from e
        raise


def _swap(tmp: Path, out: Path) -> None:
    new, old = side_name(out, "new"), side_name(out, "old")
    os.rename(tmp, new)
    os.rename(out, old)
    os.rename(new, out)
    _rmtree(old)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file through a temporary file beside it and `os.replace` (the old content stays whole
    until the new one is complete); the mode follows the umask.

    Example:
        >>> import tempfile, os
        >>> p = write_atomic(os.path.join(tempfile.mkdtemp(), "a.json"), "{}")
        >>> p.read_text()
        '{}'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{side_name(path, 'tmp').name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def preallocate(fd: int, nbytes: int, path: str | os.PathLike | None = None) -> bool:
    """Reserve `nbytes` of disk for the file open as `fd` before it is written (Linux `fallocate`):
    a full disk fails here, before any byte is written, and the writes that follow skip the
    filesystem's block allocation (ext4: a third of the CPU time of writing 2 GB into the page cache).
    Returns False where the OS or filesystem has no such call (nothing reserved, nothing written).

    Raises:
        OSError: ENOSPC (or another error of the call itself), naming `path`.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryFile() as f:
        ...     _ = preallocate(f.fileno(), 4096)
        ...     os.fstat(f.fileno()).st_size  # the size stays what is written
        0
    """
    fallocate = _fallocate()
    if fallocate is None or nbytes <= 0:
        return False
    FALLOC_FL_KEEP_SIZE = 1  # the file's size grows only as it is written (a cut-short write stays visible)
    if fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err), None if path is None else str(path))


@functools.cache
def _fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def is_hub_id(ref: str) -> bool:
    """The one rule for "is this a model hub id?": `name` or `owner/name` (letters, digits, `_ . -`),
    not an existing path, not starting with `.`, `/` or `~`, no `..` or `--`.

    Example:
        >>> is_hub_id("mlx-community/Llama-3.2-1B-Instruct-4bit"), is_hub_id("./models/llama"), is_hub_id("a/b/c")
        (True, False, False)
    """
    return (bool(_HUB_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref
            and not Path(ref).expanduser().exists())
def regular_file(path: str | os.PathLike) -> Path:
    """`path` if it is a regular file (symlinks followed); a directory, FIFO or device is refused by
    name before anything opens it (opening a FIFO would block).

    Example:
        >>> regular_file("/")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: /: not a regular file (a directory)
    """
    import stat

    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError as e:
        raise BridgeError(f"{p}: missing") from e
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise BridgeError(f"{p}: not a regular file ({kind})")
    return p


MAX_JSON = 64 << 20  # a config or manifest larger than this is not one


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a regular file; every failure is one `BridgeError` naming the file.

    Example:
        >>> read_json("/nonexistent/config.json")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: /nonexistent/config.json: missing
    """
    import json

    p = regular_file(path)
    if p.stat().st_size > MAX_JSON:
        raise BridgeError(f"{p}: {p.stat().st_size} bytes is too large for a JSON settings file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BridgeError(f"{p}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise BridgeError(f"{p}: not valid JSON (nested too deeply)") from e
    if not isinstance(d, dict):
        raise BridgeError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def inside(directory: str | os.PathLike, name: object, where: str) -> Path:
    """`directory / name` for a file name read from a file (an index's weight_map): refused when it
    is not a relative path that stays inside `directory` (`../x`, `/etc/passwd`).

    Example:
        >>> inside("/m", "../x", "index.json")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: index.json: '../x' is not a file inside /m
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise BridgeError(f"{where}: {name!r} is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise BridgeError(f"{where}: {name!r} is not a file inside {directory}")
    return Path(directory) / name
