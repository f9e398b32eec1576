"""`mlx-bridge demo`: the whole path (MLX LoRA -> checkpoint -> HF export -> PyTorch) on the shipped base.

    mlx-bridge demo [--out DIR] [--steps N] [--keep] [--quick] [--force]

Without `--out` the run happens in a temporary directory, removed at the end unless `--keep`.
Exit code 0 when the export passes the parity check and both sides give the same accuracy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..errors import BridgeError
from ..fsutil import check_output_dir


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="working directory (default: a temporary directory)")
    parser.add_argument("--steps", type=int, help="LoRA steps (default: 200; 60 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--quick", action="store_true", help="a shorter run (60 steps, 50 test examples; used by the tests)")
    parser.add_argument("--force", action="store_true",
                        help="reuse a non-empty --out directory (replaces the demo's own files in it)")


def main(args: argparse.Namespace) -> int:
    from .run import BASE, RUN_PATHS, run_demo, table

    if args.steps is not None and args.steps < 1:
        raise BridgeError(f"--steps: must be a positive integer, got {args.steps}")
    if not (BASE / "config.json").is_file():
        raise BridgeError(f"{BASE}: the demo base model is missing (run scripts/make_demo_base.py)")
    temp = args.out is None
    if temp:
        out = Path(tempfile.mkdtemp(prefix="mlx-bridge-demo-"))
    else:
        out = check_output_dir(args.out, args.force)
        if args.force:  # remove what an earlier demo wrote there, nothing else
            for name in RUN_PATHS.values():
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    print(f"demo directory: {out}", flush=True)
    try:
        res = run_demo(out, preset="quick" if args.quick else "default", steps=args.steps)
    finally:
        if temp and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    removed = temp and not args.keep
    print()
    print(table(res, files=not removed))
    if removed:
        print(f"(removed {out}; pass --keep or --out DIR to keep the files)")
    acc = res["accuracy"]
    same = acc["mlx"]["after"] == acc["pytorch"]["after"] and acc["mlx"]["before"] == acc["pytorch"]["before"]
    ok = res["parity"]["passed"] and same
    gain = 100 * (acc["pytorch"]["after"] - acc["pytorch"]["before"])
    print(f"{'OK' if ok else 'FAILED'}: fine-tuning gained {gain:+.1f} points of exact match; MLX and PyTorch "
          f"{'agree' if same else 'DISAGREE'}; parity {'passed' if res['parity']['passed'] else 'FAILED'}")
    return 0 if ok else 1
