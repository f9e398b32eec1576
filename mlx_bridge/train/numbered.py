"""Numbered checkpoints: `OUT/checkpoints/step-NNNNNNN/` beside the latest checkpoint in `OUT` itself.

With `save_every` N, every N optimizer steps (and at the end) the trainer writes a complete checkpoint
into `OUT/checkpoints/step-<step, 7 digits>/` (the same files as any checkpoint: each one exports and
resumes on its own), then makes `OUT` the same checkpoint by hard-linking its files (copies where the
file system has no hard links; probes are computed once per save). `OUT` is always the latest;
`keep_last` N removes all but the N newest numbered directories.

    OUT/                          the latest checkpoint (what `export OUT` and `--resume` read)
    OUT/checkpoints/step-0000100/
    OUT/checkpoints/step-0000200/  = OUT

mlx-lm's own trainer writes `NNNNNNN_adapters.safetensors` beside `adapters.safetensors` instead.

Example:
    >>> numbered_dir("ckpt", 200)
    PosixPath('ckpt/checkpoints/step-0000200')
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

SUBDIR = "checkpoints"
PATTERN = re.compile(r"step-(\d{7,})")


def numbered_dir(out: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` goes."""
    return Path(out) / SUBDIR / f"step-{step:07d}"


def numbered(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of the numbered checkpoints in `out`, oldest first."""
    d = Path(out) / SUBDIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := PATTERN.fullmatch(p.name))]
    return sorted(found)


def prune(out: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove all but the `keep_last` newest numbered checkpoints (0 keeps all); returns the removed."""
    if keep_last <= 0:
        return []
    old = [p for _, p in numbered(out)[:-keep_last]]
    for p in old:
        shutil.rmtree(p)
    return old


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (checkpoint files are written once, never changed in place), or copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
