"""`--help` that states every default: each option's help ends with its default value.

argparse's `ArgumentDefaultsHelpFormatter` prints `(default: None)` for options whose default lives
elsewhere (the YAML config and `TrainConfig` for `train`) and skips options without a help string;
`show_defaults` writes the real default into each help text instead, once, after the parser is built.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--rank", type=int, help="adapter rank")
    >>> _ = p.add_argument("--port", type=int, default=8000)
    >>> show_defaults(p, {"rank": 8})
    >>> [a.help for a in p._actions[1:]]
    ['adapter rank (default: 8)', '(default: 8000)']
"""

from __future__ import annotations

import argparse


# options that take no value: "off unless given" needs no default in the help
FLAGS = (argparse._HelpAction, argparse._VersionAction, argparse._StoreConstAction, argparse._CountAction,
         argparse._AppendConstAction)


def _shown(value) -> str | None:
    if value is None or value is False or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else None
    return str(value)


def show_defaults(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Append "(default: X)" to the help of every option with a default.

    Args:
        parser: a built parser (its actions are edited in place).
        defaults: dest -> default shown instead of the parser's own (for options whose parser default
            is None so that a config file can still set them).

    An option is left alone when it is a flag (store_true/false/const), its help is suppressed or
    already mentions its default, or its default is None (a value decided at run time, which the help
    explains).
    """
    defaults = defaults or {}
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or isinstance(a, FLAGS):
            continue
        if "default" in (a.help or "").lower():
            continue
        value = _shown(defaults.get(a.dest, a.default))
        if value is None:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            value = "on" if value == "True" else "off"
        a.help = f"{a.help} (default: {value})" if a.help else f"(default: {value})"
