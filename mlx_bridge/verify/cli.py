"""`mlx-bridge verify DIR [--against CHECKPOINT]`: parity report of an export; exit 1 when it fails.

DIR is a Hugging Face export, or a PEFT adapter export (merged into its MLX base to be run; `--base`).

Example:
    mlx-bridge verify deploy/alpaca
    mlx-bridge verify deploy/alpaca --against checkpoints/alpaca-lora --dtype float32
"""

from __future__ import annotations

import argparse
import sys


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="DIR", help="export directory")
    p.add_argument("--against", default=None, metavar="CHECKPOINT_OR_MLX_DIR",
                   help="compute fresh MLX outputs from this checkpoint or MLX model (needs mlx)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="auto", help="auto (config.json), float32, bfloat16 or float16")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "transformers"))
    p.add_argument("--atol", type=float, default=None, help="absolute logit tolerance (default: by dtype)")
    p.add_argument("--rtol", type=float, default=None, help="tolerance relative to max |logit| (default: by dtype)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per probe made with --against")
    p.add_argument("--base", default=None, metavar="MLX_BASE_DIR",
                   help="for a PEFT adapter directory: the MLX base it applies to (default: from its manifest)")
    p.add_argument("--no-write", action="store_true", help="do not write parity.json")


def main(args: argparse.Namespace) -> int:
    from .parity import REPORT, summary, verify

    report = verify(args.export_dir, args.against, device=args.device, dtype=args.dtype, backend=args.backend,
                    atol=args.atol, rtol=args.rtol, max_new_tokens=args.max_new_tokens, write=not args.no_write,
                    base=args.base, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary(report))
    if not args.no_write:
        print(f"wrote {args.export_dir.rstrip('/')}/{REPORT}")
    return 0 if report["passed"] else 1
