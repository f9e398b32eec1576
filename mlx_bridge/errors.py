"""User-facing errors.

A `BridgeError` is bad input or a refused operation: the CLI prints its message as one short line and
exits with its `exit_code` (2; 1 for a failed check), no traceback unless `--debug`. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

SHOWN = 3  # problems named in the one line; `--debug` prints every one


class BridgeError(Exception):
    """Bad input or a refused operation; the message names the file, key or field.

    `details` holds the full list when the message shows only the first few problems.

    Example:
        >>> raise BridgeError("model.safetensors: header length 99999 is past the end of the file")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: model.safetensors: header length 99999 is past the end of the file
    """

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = list(details or [])


class CheckFailed(BridgeError):
    """A check of the tool's own output failed (parity): exit code 1, nothing shipped."""

    exit_code = 1


def raise_all(problems: list[str], what: str = "") -> None:
    """Raise one `BridgeError` saying how many problems and the first few, or return if there are none.

    Every problem is kept in the error's `details` (printed by `--debug`).

    Example:
        >>> raise_all([])
        >>> raise_all(["a: missing", "b: wrong shape"], "adapter")
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: adapter: 2 problems: a: missing; b: wrong shape
        >>> raise_all([f"k{i}: missing" for i in range(9)])
        Traceback (most recent call last):
        ...
        mlx_bridge.errors.BridgeError: 9 problems: k0: missing; k1: missing; k2: missing; ... 6 more (--debug lists all)
    """
    if not problems:
        return
    head = f"{what}: " if what else ""
    if len(problems) == 1:
        raise BridgeError(head + problems[0], problems)
    shown = "; ".join(problems[:SHOWN])
    if len(problems) > SHOWN:
        shown += f"; ... {len(problems) - SHOWN} more (--debug lists all)"
    raise BridgeError(f"{head}{len(problems)} problems: {shown}", problems)
