"""The export's floor on this machine: the CPU seconds that cannot go, and the wall time with perfect overlap.

The export with every check does three kinds of work: hashing every source and output byte (4.4 GB
for TinyLlama; blake3 since manifests record it, sha256 before), the LoRA fuse, and moving the bytes
(pread, write). This script measures, in one run:

- the rate of each hash `mlx_bridge.hashing` knows on one thread of this CPU (blake3, sha256);
- one profiled export (`export_profile.profile`): its CPU seconds, the part that is hashing, the bytes
  hashed and the single-threaded start-up;
- the export as it is and the same export hashing everything in sha256 (what versions before blake3
  did: every `hashing.Hasher` made sha256, the manifest records `sha256:`), run alternately;

and prints the wall time the export would take on the machine's cores with perfect overlap (start-up
alone, everything else spread over all cores): as it is, with the hashing at sha256's rate, and without
any hashing. With `--fuse` it also times `mlx_lm.fuse --dequantize` (the benchmark's anchor) in the same
run and prints each as a fraction of it, beside the goal of issue 13 (0.10x).

    python benchmarks/export_floor.py --shape tinyllama --workdir /tmp/bench13 --fuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import GOAL, SHAPES, _uptime, hash_rates, measure, model_dirs, warm  # noqa: E402
from export_profile import profile  # noqa: E402

from mlx_bridge.hashing import DEFAULT  # noqa: E402

PLAIN = "import sys; from mlx_bridge.cli import main; sys.exit(main(['export', *sys.argv[1:], '--no-progress']))"
# the same export with every hash in sha256 (as before blake3)
SHA256 = """
import sys
import mlx_bridge.hashing as hs
init = hs.Hasher.__init__
hs.Hasher.__init__ = lambda self, algo=None: init(self, "sha256")
from mlx_bridge.cli import main
sys.exit(main(['export', *sys.argv[1:], '--no-progress']))
"""
RUNS = {f"as it is ({DEFAULT})": PLAIN, "every hash in sha256": SHA256}


def ab(work: Path, shape: str, repeat: int) -> dict[str, list[tuple[float, float, float]]]:
    """Each of RUNS `repeat` times, alternately: {name: [(seconds, CPU s, load at the start)]}; each run's
    manifest must record its own algorithm for every file."""
    base, ad = model_dirs(work, shape)
    runs: dict[str, list] = {name: [] for name in RUNS}
    for r in range(repeat):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            x = work / f"out-floor-{r}"
            shutil.rmtree(x, ignore_errors=True)
            warm(base, ad)
            load = os.getloadavg()[0]
            secs, _, cpu = measure([sys.executable, "-c", RUNS[name], str(ad), "--out", str(x)])
            m = json.loads((x / "manifest.json").read_text())
            want = DEFAULT if RUNS[name] is PLAIN else "sha256"
            algos = {v.split(":")[0] for v in [*m["files"].values(), *m["export"]["source_hashes"].values()]}
            if algos != {want}:
                raise SystemExit(f"{name}: the manifest records {sorted(algos)}, not {want}")
            runs[name].append((secs, cpu, load))
            shutil.rmtree(x)
            os.sync()
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--workdir", type=Path, required=True, help="benchmarks/export.py's --workdir (model reused)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each export; the least CPU / wall is shown")
    ap.add_argument("--fuse", action="store_true", help="also time mlx_lm.fuse --dequantize (the anchor) once")
    args = ap.parse_args(argv)
    print(f"uptime at start: {_uptime()}", flush=True)
    rates = hash_rates()
    best = profile(args.workdir, args.shape, "tree", args.repeat)
    runs = ab(args.workdir, args.shape, args.repeat)
    fuse = None
    if args.fuse:
        base, ad = model_dirs(args.workdir, args.shape)
        x = args.workdir / "out-floor-fuse"
        shutil.rmtree(x, ignore_errors=True)
        warm(base, ad)
        fuse = measure([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base), "--adapter-path", str(ad),
                        "--save-path", str(x), "--dequantize"])[0]
        shutil.rmtree(x)
    print(f"uptime at end: {_uptime()}\n")

    parts, cores = best["parts"], os.cpu_count() or 1
    cpu = best["user"] + best["sys"]
    hashed = parts.get("bytes source", 0) + parts.get("bytes output", 0)
    hashing = parts.get("  of which hashing", 0.0) + parts.get("output hash", 0.0)
    start = parts.get("start-up (imports)", 0.0)

    def floor(total: float) -> float:
        return start + (total - start) / cores

    def ratio(secs: float) -> str:
        return f" {secs / fuse:8.3f}x |" if fuse else ""

    print("hashing on one thread of this CPU (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    print(f"profiled export: {cpu:.2f} CPU s, of which hashing ({DEFAULT}) {hashing:.2f} ({hashed / 1e9:.2f} GB, "
          f"{hashed / 1e9 / max(hashing, 1e-9):.2f} GB/s) and start-up {start:.2f}; load {best['load']:.1f}\n")
    rows = [(f"as it is ({DEFAULT})", cpu),
            *[(f"hashing at {a}'s rate, nothing else changed", cpu - hashing + hashed / 1e9 / r)
              for a, r in rates.items() if a != DEFAULT],
            ("no hashing at all (lower bound)", cpu - hashing)]
    print(f"| {'the profiled export, its CPU s recomputed':48} | {'CPU s':>6} | {f'wall on {cores} cores, perfect overlap':>34} |"
          + (f" {'x of fuse':>9} |" if fuse else ""))
    print(f"|{'-' * 50}|{'-' * 8}|{'-' * 36}|" + ("-" * 11 + "|" if fuse else ""))
    for name, total in rows:
        print(f"| {name:48} | {total:6.2f} | {floor(total):34.2f} |" + ratio(floor(total)))
    print(f"\n| {'measured, run alternately':26} | {'seconds':>7} | {'CPU s':>6} | {'load':>9} |" + (f" {'x of fuse':>9} |" if fuse else ""))
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 8}|{'-' * 11}|" + ("-" * 11 + "|" if fuse else ""))
    for name, v in runs.items():
        secs, c = min(r[0] for r in v), min(r[1] for r in v)
        loads = [r[2] for r in v]
        print(f"| {name:26} | {secs:7.2f} | {c:6.2f} | {min(loads):4.1f}-{max(loads):<4.1f} |" + ratio(secs))
    if fuse:
        print(f"\nmlx_lm.fuse --dequantize: {fuse:.2f} s in this run; the goal {GOAL:.2f}x is {GOAL * fuse:.2f} s.")
    print(f"\nshape {args.shape}, {cores} CPUs. Perfect overlap: the start-up (imports, one thread) plus the rest of the "
          "CPU seconds spread evenly over every core, the least wall time any scheduling of this work can take. "
          f"Measured: `mlx-bridge export AD --out X --no-progress` ({DEFAULT}) and the same with every hash in sha256 "
          f"(each manifest checked to record its algorithm), least seconds and least CPU of {args.repeat}, whole "
          "process (start-up included). CPU seconds swing with the machine's load: quote them with it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
