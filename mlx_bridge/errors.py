"""User-facing errors.

A `BridgeError` is bad input or a refused operation: the CLI prints its message as one line and exits
with code 2 (no traceback unless `--debug`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Bad input or a refused operation; the message names the file, key or field.

    Example:
        >>> raise BridgeError("model.safetensors: header length 99999 is past the end of the file")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: model.safetensors: header length 99999 is past the end of the file
    """

    exit_code = 2


def raise_all(problems: list[str], what: str = "") -> None:
    """Raise one `BridgeError` listing every problem, or return if there are none.

    Example:
        >>> raise_all([])
        >>> raise_all(["a: missing", "b: wrong shape"], "adapter")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: adapter: 2 problems: a: missing; b: wrong shape
    """
    if not problems:
        return
    head = f"{what}: " if what else ""
    if len(problems) == 1:
        raise BridgeError(head + problems[0])
    shown = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
    raise BridgeError(f"{head}{len(problems)} problems: {shown}")
