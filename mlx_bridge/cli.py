"""`mlx-bridge` command line: one argparse dispatcher with lazy imports.

Each subcommand lives in its own module with `build_parser(parser)` and `main(args) -> int`; only the
module of the chosen subcommand is imported, so `mlx-bridge export` never imports mlx or torch.

No traceback reaches the user for bad input, a missing optional extra, a closed pipe or a full disk:
one line `error: ...` on stderr (exit 2 for bad input, 1 for a failed check or an OS error); `--debug`
shows the traceback with its cause chain and every problem of a multi-problem error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .clihelp import show_defaults
from .errors import BridgeError

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("mlx_bridge.train.cli", "fine-tune a model with MLX (LoRA, QLoRA, DoRA, full)"),
    "export": ("mlx_bridge.translate.cli", "export an MLX model/checkpoint to Hugging Face or PEFT"),
    "verify": ("mlx_bridge.verify.cli", "check an export against the checkpoint's MLX probes"),
    "generate": ("mlx_bridge.deploy.cli_generate", "generate text with an exported model (PyTorch)"),
    "serve": ("mlx_bridge.serve.cli", "serve an exported model with an OpenAI-compatible API"),
    "demo": ("mlx_bridge.demo.cli", "run the whole path on the tiny model shipped with the package"),
}
# top-level module of an optional dependency -> the extra that installs it
EXTRAS = {"torch": "deploy", "safetensors": "deploy", "transformers": "deploy", "fastapi": "deploy",
          "uvicorn": "deploy", "mlx": "train", "mlx_lm": "train", "matplotlib": "train", "datasets": "hub",
          "peft": "test", "huggingface_hub": "deploy"}
MAX_LINE = 500  # characters of an error line; `--debug` prints the whole message


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so cleanups run as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _command_from_argv(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def missing_extra(e: ImportError, command: str | None) -> BridgeError | None:
    """A one-line error for an optional dependency that is not installed, or None for other import errors.

    Example:
        >>> str(missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"), "generate"))
        "mlx-bridge generate needs torch, which is not installed: pip install 'mlx-bridge[deploy]'"
    """
    top = (getattr(e, "name", None) or "").split(".")[0]
    if not isinstance(e, ModuleNotFoundError) or top not in EXTRAS:
        return None
    what = f"mlx-bridge {command}" if command else "mlx-bridge"
    return BridgeError(f"{what} needs {top}, which is not installed: pip install 'mlx-bridge[{EXTRAS[top]}]'")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks (with their causes) and every problem")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # import only the module that runs
            importlib.import_module(module).build_parser(p)
            show_defaults(p)
    return parser


def _error(e: BridgeError, debug: bool) -> int:
    msg = str(e)
    if len(msg) > MAX_LINE and not debug:
        msg = msg[:MAX_LINE] + "... (--debug shows all)"
    print(f"error: {msg}", file=sys.stderr)
    if debug:
        for p in e.details:
            print(f"  {p}", file=sys.stderr)
    return e.exit_code


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    command = _command_from_argv(argv)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (the CLI called from a worker): leave signals alone
        previous = None
    try:
        return _run(argv, command, debug)
    except BridgeError as e:
        if debug:
            _error(e, True)
            raise
        return _error(e, False)
    except BrokenPipeError:  # `mlx-bridge export ... --dry-run | head -1`
        _quiet_stdout()
        return 141
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # full disk, permissions, a vanished file: the file and the reason, one line
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str], command: str | None, debug: bool) -> int:
    try:
        parser = build_parser(command if command in COMMANDS else None)
    except ImportError as e:
        err = missing_extra(e, command)
        if err is None:
            raise
        raise err from e
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except ImportError as e:
        err = missing_extra(e, args.command)
        if err is None:
            raise
        raise err from e


if __name__ == "__main__":
    sys.exit(main())
