"""`mlx-bridge` command line: one argparse dispatcher with lazy imports.

Each subcommand lives in its own module with `build_parser(parser)` and `main(args) -> int`; only the
module of the chosen subcommand is imported, so `mlx-bridge export` never imports mlx or torch.
"""

from __future__ import annotations

import argparse
import importlib
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


def _command_from_argv(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # import only the module that runs
            importlib.import_module(module).build_parser(p)
            show_defaults(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_from_argv(argv)
    parser = build_parser(command if command in COMMANDS else None)
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
    except BridgeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
