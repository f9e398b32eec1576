"""Decode attention alone: the Triton kernel (`deploy/runners/attn_kernels.py`) against what the fast
path ran before it, on the same random bf16 cache and the fast path's additive mask (one row padded).

Qwen3-30B-A3B's attention (32 query heads, 4 kv heads of 128) against SDPA (cuDNN or flash, as PyTorch
picks, GQA folded into the query axis as `fused._decode_attend` did), and gpt-oss-20b's (64 / 8 of 64,
sinks) against the eager sinks formula (`layers.attend`), at batch 1, 8, 32 and cache buckets of 512
and 4096 positions. Median of CUDA-graph replays of one call; bytes = the keys and values read.

    python benchmarks/decode_attention.py             # CUDA only
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.decode import bandwidth
from benchmarks.moe_kernels import timed
from mlx_bridge.deploy.native.layers import attend
from mlx_bridge.deploy.runners.attn_kernels import decode, splits
from mlx_bridge.deploy.runners.fused import rope_masks

SHAPES = {"qwen3-30b-a3b": (32, 4, 128, False), "gpt-oss-20b": (64, 8, 64, True)}


def main(argv=None) -> int:
    dev = torch.device("cuda")
    bw = bandwidth(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s")
    for name, (H, Hkv, D, sink) in SHAPES.items():
        for S in (512, 4096):
            for B in (1, 8, 32):
                torch.manual_seed(0)
                q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
                k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
                pad = torch.zeros(B, dtype=torch.long, device=dev)
                pad[0] = 7
                _, ms = rope_masks([], torch.tensor([S - S // 4], device=dev), pad, S, [], torch.bfloat16, True)
                s = torch.randn(H, device=dev, dtype=torch.bfloat16) if sink else None
                scale = D ** -0.5
                if sink:
                    ref = timed(lambda: attend(q, k, v, ms[None], scale, None, s))
                    ref_name = "eager sinks"
                else:
                    qg = q.reshape(B, Hkv, H // Hkv, D)
                    ref = timed(lambda: F.scaled_dot_product_attention(qg, k, v, attn_mask=ms[None], scale=scale))
                    ref_name = "SDPA"
                t = timed(lambda: decode(q, k, v, ms[None], scale, None, s))
                need = 2 * k.numel() * 2
                print(f"{name:14s} B={B:3d} S={S:5d} splits {splits(B, Hkv, S, 64):2d}  {need / 1e6:6.1f} MB  "
                      f"triton {t * 1e6:6.1f} us ({need / t / bw:4.0%} of copy)  {ref_name} {ref * 1e6:6.1f} us "
                      f"({need / ref / bw:4.0%})  x{ref / t:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
