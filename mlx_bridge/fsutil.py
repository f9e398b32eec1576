"""Files: atomic output directories and hashing.

Everything the tool writes goes into a temporary directory beside the target and is renamed into
place at the end, so an interrupted run never leaves a half-written result under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BridgeError


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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` when the block succeeds.

    On an exception the temporary directory is removed and `out` is left as it was.

    Example:
        >>> import tempfile, os
        >>> d = os.path.join(tempfile.mkdtemp(), "res")
        >>> with atomic_dir(d) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> sorted(os.listdir(d))
        ['a.txt']
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


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
