"""`mlx-bridge serve DIR`: an OpenAI-compatible server for an export directory (see docs/serving.md).

    mlx-bridge serve deploy/alpaca --port 8000 --api-key sk-local --device cuda --dtype bfloat16
    curl -H "Authorization: Bearer sk-local" http://127.0.0.1:8000/v1/models
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import BridgeError
from ..deploy.loader import add_load_arguments
from .app import MAX_BODY_BYTES, MAX_TOKENS_LIMIT


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR", help="export directory (Hugging Face layout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MLX_BRIDGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MLX_BRIDGE_API_KEY, else none)")
    parser.add_argument("--model-name", help="model id clients send and /v1/models lists (default: the model's name)")
    add_load_arguments(parser, default_device="cpu")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT,
                        help=f"largest max_tokens a request may ask for (default {MAX_TOKENS_LIMIT})")
    parser.add_argument("--max-batch", type=int, default=8, help="most prompts decoded together (default 8)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body; larger gets 413 (default {MAX_BODY_BYTES})")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the fast path's decode step before serving (default: on; CUDA only)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def main(args: argparse.Namespace) -> int:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: must be 0..65535")
    for flag in ("max_tokens_limit", "max_batch", "max_body_bytes"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key: empty")
    if not Path(args.path).is_dir():
        problems.append(f"{args.path}: not a directory")
    if problems:
        raise BridgeError("; ".join(problems))

    from ..deploy.loader import load_from_args
    from ..deploy.runners.fast import warm_up
    from .app import bind, create_app, generation_defaults, serve

    sock = bind(args.host, args.port)  # before loading: a taken port fails in a second, not after the model
    model = load_from_args(args.path, args)
    if args.warmup and model.device.type == "cuda":
        t = time.perf_counter()
        done = warm_up(model, args.max_batch)
        if done:
            print(f"fast path ready ({done}) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    name = args.model_name or model.name
    app = create_app(model, model_name=name, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                     max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                     defaults=generation_defaults(args.path))
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"serving {name!r} ({args.path}, {model.device}, {model.dtype}) on http://{args.host}:{port}/v1",
          file=sys.stderr)
    serve(app, log_level=args.log_level, sock=sock)
    return 0
