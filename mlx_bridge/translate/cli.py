"""`mlx-bridge export SRC --out DIR`: MLX model/adapter/checkpoint -> Hugging Face or PEFT."""

from __future__ import annotations

import argparse

from ..formats.dtypes import OUTPUT_DTYPES


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", help="MLX model dir, mlx-lm adapter dir, or mlx-bridge checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="hf", choices=["hf", "peft", "gguf"],
                   help="hf: fused full model; peft: adapter only; gguf: llama.cpp / Ollama / LM Studio file")
    p.add_argument("--gguf-type", default=None, help="with --format gguf: q4_k_m, q5_k_m, q6_k, q8_0, q4_0, f16 (default), "
                   "bf16 or f32")
    p.add_argument("--gguf-split", default=None, help="with --format gguf: split into gguf-split shards of this size")
    p.add_argument("--dtype", default="auto", choices=["auto", *OUTPUT_DTYPES], help="auto keeps the base's dtypes")
    p.add_argument("--base", default=None, help="base model dir (overrides the adapter config / manifest)")
    p.add_argument("--hf-base", default=None, help="the Hugging Face checkpoint the MLX base was converted from: "
                   "tensors mlx-lm drops (vision towers) are copied from it (not needed for a base mlx_vlm.convert "
                   "wrote: its own vision tower is used)")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--dry-run", action="store_true", help="print every output tensor and what it is made of; write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--verify", dest="verify", action="store_true", default=None, help="run the parity check (needs torch; default: when torch is installed and the source has probes)")
    v.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    p.add_argument("--keep-failed", action="store_true",
                   help="when the parity check fails, keep the output as OUT.failed (exit 1 all the same)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="export onto a base whose weights differ from the checkpoint manifest's hashes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    from .export import export

    export(args.src, args.out, format=args.format, dtype=args.dtype, base=args.base, hf_base=args.hf_base,
           shard_size=args.shard_size, dry_run=args.dry_run, force=args.force, verify=args.verify,
           progress=not args.no_progress, allow_base_mismatch=args.allow_base_mismatch, keep_failed=args.keep_failed,
           gguf_type=args.gguf_type, gguf_split=args.gguf_split)
    return 0
