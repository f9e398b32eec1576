"""`mlx-bridge serve DIR`: an OpenAI-compatible server for an export directory (see docs/serving.md).

    mlx-bridge serve deploy/alpaca --port 8000 --api-key sk-local --device cuda --dtype bfloat16
    curl -H "Authorization: Bearer sk-local" http://127.0.0.1:8000/v1/models
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import BridgeError
from ..deploy.loader import add_load_arguments
from .app import BODY_TIMEOUT, MAX_BODY_BYTES, MAX_REQUEST_TOKENS, MAX_TOKENS_LIMIT, MIX
from .http import Limits


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR", help="export directory (Hugging Face layout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MLX_BRIDGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MLX_BRIDGE_API_KEY, else none)")
    parser.add_argument("--model-name", help="model id clients send and /v1/models lists (default: the model's name)")
    add_load_arguments(parser, default_device="auto")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT,
                        help=f"largest max_tokens a request may ask for (default {MAX_TOKENS_LIMIT})")
    parser.add_argument("--max-batch", type=int, default=8, help="most rows decoding at once: KV slots (default 8)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="positions per KV slot, prompt + max_tokens (default: the context, at most 4096)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests allowed to wait for a slot; more get 429 (default 256)")
    parser.add_argument("--batch-sizes", default=None, metavar="1,2,4,...",
                        help="decode batch sizes prepared at start-up (default: powers of two up to --max-batch); "
                             "fewer start faster, a step then runs at the next size up")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="most prompt tokens of one prefill call; a row gets one chunk between two decode steps (default 512)")
    parser.add_argument("--mixed-lanes", type=int, default=MIX[0],
                        help="most prompt chunks one step carries beside the decoding rows (mixed steps, vLLM's "
                             "chunked prefill; prepared at 1, 4, 16, ... lanes); 0: separate prefill calls only "
                             f"(default {MIX[0]})")
    parser.add_argument("--mixed-tokens", type=int, default=MIX[1],
                        help=f"most prompt tokens of one riding chunk (default {MIX[1]})")
    parser.add_argument("--max-request-tokens", type=int, default=MAX_REQUEST_TOKENS,
                        help=f"most prompts x n x max_tokens in one request (default {MAX_REQUEST_TOKENS})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body; larger gets 413 (default {MAX_BODY_BYTES})")
    d = Limits()
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"open connections + running requests; more get 503 (default {d.max_connections})")
    parser.add_argument("--idle-timeout", type=int, default=d.idle_timeout,
                        help=f"seconds an idle keep-alive connection stays open (default {d.idle_timeout})")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout,
                        help=f"seconds to send a complete request head (default {d.header_timeout:g})")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                        help=f"seconds to send a request body; later gets 408 (default {BODY_TIMEOUT:g})")
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                        help="compile and capture every decode shape before serving (default: on)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def main(args: argparse.Namespace) -> int:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: must be 0..65535")
    for flag in ("max_tokens_limit", "max_batch", "max_body_bytes", "max_queue", "prefill_chunk", "max_request_tokens",
                 "max_connections", "idle_timeout", "header_timeout", "body_timeout", "mixed_tokens"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.mixed_lanes < 0:
        problems.append(f"--mixed-lanes {args.mixed_lanes}: must be 0 (off) or more")
    sizes = None
    if args.batch_sizes is not None:
        try:
            sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            problems.append(f"--batch-sizes {args.batch_sizes}: a comma list of positive integers")
    if args.max_model_len is not None and args.max_model_len < 2:
        problems.append(f"--max-model-len {args.max_model_len}: must be at least 2")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key: empty")
    if not Path(args.path).is_dir():
        problems.append(f"{args.path}: not a directory")
    if problems:
        raise BridgeError("; ".join(problems))

    from ..deploy.loader import load_from_args
    from .app import create_app, generation_defaults
    from .http import bind, serve

    defaults = generation_defaults(args.path)
    sock = bind(args.host, args.port)  # before loading: a taken port fails in a second, not after the model
    model = load_from_args(args.path, args)
    name = args.model_name or model.name
    app = create_app(model, model_name=name, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                     max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_len=args.max_model_len, prefill_chunk=args.prefill_chunk, batch_sizes=sizes,
                     mix=(args.mixed_lanes, args.mixed_tokens) if args.mixed_lanes else None,
                     max_request_tokens=args.max_request_tokens, body_timeout=args.body_timeout,
                     defaults=defaults, prepare=False)
    if args.prepare:
        print(f"decode steps prepared: {app.state.engine.prepare()}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"serving {name!r} ({args.path}, {model.device}, {model.dtype}) on http://{args.host}:{port}/v1",
          file=sys.stderr)
    serve(app, log_level=args.log_level, sock=sock,
          limits=Limits(args.max_connections, args.idle_timeout, args.header_timeout))
    return 0
