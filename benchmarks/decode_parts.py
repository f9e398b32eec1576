"""The decode step's MoE and attention parts, each against what the fast path ran before it (GPU time).

For Qwen3-30B-A3B's and gpt-oss-20b's shapes at batch 1 and 8, random bf16 weights, GPU time per
call: a CUDA graph of 50 calls replayed (median of 10), so launch gaps inside the graph count as in
the fast path's captured step but the graph's own launch does not:

- router: `F.linear` + the routing kernel (`route_fused`) against both in one launch (`router_fused`);
- attention over a 256-position cache (the benchmark's bucket) and 4096: the split merge in a second
  kernel (`fold=False`) against the last split merging (`fold=True`);
- routed experts: every decode block configuration (`moe_kernels.DECODE_CONFIGS`), `*` the one
  `tuned` picks.

    python benchmarks/decode_parts.py               # CUDA only
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from mlx_bridge.deploy.runners import attn_kernels as ak
from mlx_bridge.deploy.runners import moe_kernels as mk
from mlx_bridge.deploy.runners.fused import rope_masks

SHAPES = {  # E, k, D, I, gpt_oss layout, H, Hkv, hd
    "qwen3-30b-a3b": (128, 8, 2048, 768, False, 32, 4, 128),
    "gpt-oss-20b": (32, 4, 2880, 2880, True, 64, 8, 64),
}


def gpu_us(fn, reps: int = 50) -> float:
    """Microseconds of GPU time per call of fn: a graph of `reps` calls, median of 10 replays."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


def main() -> int:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; us of GPU time a call")
    for name, (E, k, D, I, oss, H, Hkv, hd) in SHAPES.items():
        torch.manual_seed(0)
        r = torch.randn(E, D, device=dev, dtype=dt) / D ** 0.5
        rb = torch.randn(E, device=dev, dtype=dt) if oss else None
        gu = torch.randn(E, 2 * I, D, device=dev, dtype=dt) / D ** 0.5
        dn = torch.randn(E, D, I, device=dev, dtype=dt) / I ** 0.5
        kind = "gpt_oss" if oss else "qwen3_moe"
        if oss:  # the layout `SparseMoe.stack` keeps: transposed views of row-major copies
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        gub, dnb = (torch.zeros(E, 2 * I, device=dev, dtype=dt), torch.zeros(E, D, device=dev, dtype=dt)) if oss else (None, None)
        for T in (1, 8):
            x = torch.randn(T, D, device=dev, dtype=dt)
            two = gpu_us(lambda: mk.route_fused(F.linear(x, r, rb), kind, k, True))
            one = gpu_us(lambda: mk.router_fused(x, r, rb, kind, k, True))
            print(f"{name:14s} T={T}  router: linear + route {two:5.1f}   one launch {one:5.1f}", flush=True)
            w, idx = mk.router_fused(x, r, rb, kind, k, True)
            ts = [gpu_us(lambda: mk.routed(x, w, idx, gu, gub, dn, dnb, oss, 1.702, 7.0, cfg=c, gather=True))
                  for c in mk.DECODE_CONFIGS]
            mk.routed(x, w, idx, gu, gub, dn, dnb, oss, 1.702, 7.0)  # `tuned` picks one
            pick = next(c for key, c in mk._TUNED.items() if key[0] == T * k and key[2] == I)
            print(f"{name:14s} T={T}  experts: " + "  ".join(
                f"{'*' if c is pick else ''}{c['BN']}/{c['num_stages']}|{c['down']['BN']}/{c['down']['num_stages']} {t:.1f}"
                for c, t in zip(mk.DECODE_CONFIGS, ts)), flush=True)
            for S in (256, 4096):
                q = torch.randn(T, 1, H, hd, device=dev, dtype=dt).transpose(1, 2)
                kc, vc = (torch.randn(T, Hkv, S, hd, device=dev, dtype=dt) for _ in range(2))
                _, ms = rope_masks([], torch.tensor([S // 2], device=dev), torch.zeros(T, dtype=torch.long, device=dev),
                                   S, [], dt, True)
                sinks = torch.randn(H, device=dev, dtype=dt) if oss else None
                t2 = gpu_us(lambda: ak.decode(q, kc, vc, ms[None], hd ** -0.5, None, sinks, fold=False))
                t1 = gpu_us(lambda: ak.decode(q, kc, vc, ms[None], hd ** -0.5, None, sinks))
                n = ak.splits(T, Hkv, S, 64 if hd * 2 <= 256 else 32)
                print(f"{name:14s} T={T}  attention S={S} ({n} splits): two kernels {t2:5.1f}   folded {t1:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
