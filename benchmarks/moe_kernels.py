"""Bandwidth of the routed-experts kernels (`deploy/runners/moe_kernels.py`) for real MoE shapes.

For each shape and batch, random bf16 experts (gpt_oss: stored as `SparseMoe.stack` keeps them) and
router logits; the bytes a call must read are the touched experts' weights (each once) plus the
activations; GB/s over the median of CUDA-graph replays, against the device-to-device copy bandwidth
measured in the same run. Both paths are timed up to batch 32: a block per routed row ("gather", no
grouping) and rows grouped by expert ("grouped"); `*` marks the one `gathers` picks. At batch 1 a few
block configurations too (the first row of a group is what `routed` runs by default: at decode the
pipeline depth `moe_kernels.tuned` timed, printed after it). Last, the routing
alone: PyTorch's softmax/top-k/normalise against the one-kernel `route_fused`.

    python benchmarks/moe_kernels.py                       # CUDA only
    python benchmarks/moe_kernels.py --batches 1
"""

from __future__ import annotations

import statistics

import torch

from mlx_bridge.deploy.native.moe import route
from mlx_bridge.deploy.runners import moe_kernels as mk

SHAPES = {  # E, k, D, I, gpt_oss layout
    "qwen3-30b-a3b": (128, 8, 2048, 768, False),
    "gpt-oss-20b": (32, 4, 2880, 2880, True),
}
# the default first (decode: `moe_kernels.tuned`'s choice); two stages: two [gate; up] programs an SM (batch 1 in one wave on 132 SMs)
CONFIGS = [None, dict(BM=16, BN=32, BK=256, num_warps=4, num_stages=2), dict(BM=16, BN=32, BK=128, num_warps=4, num_stages=3),
           dict(BM=16, BN=16, BK=256, num_warps=4, num_stages=2), dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)]


def timed(fn, n=50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts[5:])


def main(argv=None) -> int:
    import argparse

    from benchmarks.decode import bandwidth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,512")
    batches = [int(b) for b in ap.parse_args(argv).batches.split(",")]

    dev = torch.device("cuda")
    bw = bandwidth(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s")
    for name, (E, k, D, I, oss) in SHAPES.items():
        torch.manual_seed(0)
        if oss:  # (E, D, 2I) and (E, I, D) as transposed views of row-major copies (`SparseMoe.stack`)
            ex = (torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16).mul_(0.02).transpose(1, 2),
                  torch.zeros(E, 2 * I, device=dev, dtype=torch.bfloat16),
                  torch.randn(E, D, I, device=dev, dtype=torch.bfloat16).mul_(0.02).transpose(1, 2),
                  torch.zeros(E, D, device=dev, dtype=torch.bfloat16))
        else:
            ex = (torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02, None,
                  torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * 0.02, None)
        per_expert = sum(t[0].numel() * 2 for t in ex if t is not None)
        kind = "gpt_oss" if oss else "qwen3_moe"
        for T in batches:
            x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
            logits = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
            w, idx = route(logits, kind, k, True)
            touched = idx.unique().numel()
            need = touched * per_expert + T * D * 2 * 2
            for gather in (True, False) if T <= 32 else (False,):
                for cfg in CONFIGS if T == 1 and gather else [None]:
                    t = timed(lambda: mk.routed(x, w, idx, *ex, oss, 1.702, 7.0, cfg=cfg, gather=gather))
                    pick = "*" if gather == mk.gathers(T, k, E) else " "
                    print(f"{name:14s} T={T:4d} {'gather' if gather else 'grouped':7s}{pick} experts {touched:3d} "
                          f"{need / 1e6:8.1f} MB {t * 1e6:8.1f} us {need / t / 1e9:7.0f} GB/s ({need / t / bw:.0%} of copy)  "
                          f"{cfg or 'default ' + str(mk._TUNED.get((T * k, E, I, D, x.dtype, oss, oss)) or '')}", flush=True)
            if T in (1, 32):
                t_ref = timed(lambda: route(logits, kind, k, True))
                t_fused = timed(lambda: mk.route_fused(logits, kind, k, True))
                print(f"{name:14s} T={T:4d} routing: PyTorch {t_ref * 1e6:.1f} us, route_fused {t_fused * 1e6:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
