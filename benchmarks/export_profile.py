"""Where an export's time goes: CPU seconds of each part of `mlx-bridge export` (hf), from one run.

Runs the export of `benchmarks/export.py`'s model (built there, reused with the same --workdir) in a
child process whose parts are wrapped to add up their threads' CPU time (`time.thread_time`): the
hash of the source (the bytes the export reads, handed over, and what the hash reads itself) and of
the output (each in the algorithm the export uses: `mlx_bridge/hashing.py`), the making of each chunk (pread, LoRA fuse, NaN/Inf scan), whole tensors (`materialize`),
and the writes. The rest is start-up (imports), the
plan, the tokenizer and manifest, and the writer's own Python. With 2 cores the wall time is at least
half the total CPU time.

    python benchmarks/export_profile.py --shape tinyllama --workdir /tmp/bench13
    python benchmarks/export_profile.py --format gguf --gguf-type q8_0 --shape tinyllama --workdir /tmp/b15

With `--format gguf` (the model `benchmarks/export.py --format gguf` builds, reused with the same --workdir):
the hash of the source and of the output, the blocks' reads, LoRA fuse, NaN/Inf scan and quantizer, and
the writer's own thread (writes, flushes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import SHAPES, gguf_model_dirs, model_dirs, warm  # noqa: E402

# each part's CPU seconds: T[part], added up over the threads that run it
TIMED = r"""
import collections, json, resource, sys, threading, time
import mlx_bridge.hashing as hs

T, lock, local = collections.defaultdict(float), threading.Lock(), threading.local()

def timed(key, f):
    def g(*a, **k):
        c = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            with lock:
                T[key] += time.thread_time() - c
    return g

def timed_hashes(account):  # every hash of mlx_bridge.hashing adds its updates' thread CPU: account(dt, nbytes)
    def wrap(make):
        class Timed:
            def __init__(self):
                self.h = make()
            def update(self, b):
                c = time.thread_time()
                self.h.update(b)
                dt = time.thread_time() - c
                with lock:
                    account(dt, memoryview(b).nbytes)
            def hexdigest(self):
                return self.h.hexdigest()
        return Timed
    hs.ALGORITHMS.update({k: wrap(v) for k, v in hs.ALGORITHMS.items()})
"""

CHILD = TIMED + r"""
import mlx_bridge.translate.chunks as ch, mlx_bridge.translate.execute as ex
import mlx_bridge.translate.export as export, mlx_bridge.translate.source_hash as sh
from mlx_bridge.formats import StreamWriter

def account(dt, n):  # the hash part, by the thread that runs it (StreamHasher's thread: the output)
    if not threading.current_thread().name.startswith("hash-output"):  # the source's
        T["  of which hashing"] += dt
        T["bytes source"] += n
        if not getattr(local, "reading", False):  # handed over by the writer (not read here)
            T["source hash (read + hash)"] += dt
    else:
        T["output hash"] += dt
        T["bytes output"] += n

def reading(f):  # the source hash reading a file itself (what the export did not hand over)
    def g(*a, **k):
        local.reading = True
        try:
            return f(*a, **k)
        finally:
            local.reading = False
    return g

timed_hashes(account)
export.hash_file = timed("source hash (read + hash)", reading(hs.hash_file))
sh._File.read = timed("source hash (read + hash)", reading(sh._File.read))
ex.make = timed("make chunks (total)", ch.make)
ch._pread = timed("  pread", ch._pread)
ch.fuse_rows = timed("  LoRA fuse (float32, rounded)", ch.fuse_rows)
ch.count_nonfinite = timed("  NaN/Inf scan", ch.count_nonfinite)
ex.materialize = timed("whole tensors (materialize)", ex.materialize)
StreamWriter.write_part = timed("write (syscalls)", StreamWriter.write_part)
from mlx_bridge.cli import main
r = resource.getrusage(resource.RUSAGE_SELF)
T["start-up (imports)"] = r.ru_utime + r.ru_stime  # single-threaded: cannot overlap with anything
t0 = time.perf_counter()
rc = main(["export", sys.argv[1], "--out", sys.argv[2], "--no-progress"])
wall = time.perf_counter() - t0
r = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # exec resets it
print(json.dumps({"rc": rc, "wall": wall, "user": r.ru_utime, "sys": r.ru_stime, "hwm_mb": hwm / 1024,
                  "parts": dict(T)}))
"""

GGUF_CHILD = TIMED + r"""
import mlx_bridge.translate.export as export, mlx_bridge.translate.parts as parts
import mlx_bridge.formats.safetensors as st
from mlx_bridge.translate.gguf import write

export.hash_file = timed("source hash (read + hash)", export.hash_file)
def account(dt, n):  # the output's hash: the writer (the main thread), from the bytes handed to the file
    if threading.current_thread() is threading.main_thread():
        T["  output hash"] += dt
timed_hashes(account)
write._compute = timed("blocks (total)", write._compute)
st.SafetensorsFile.read = timed("  pread", st.SafetensorsFile.read)
parts.fuse_lora = timed("  LoRA fuse (float32)", parts.fuse_lora)
parts.count_nonfinite = timed("  NaN/Inf scan", parts.count_nonfinite)
write.quantize = timed("  quantize", write.quantize)
write._Blocks.tofile = timed("writer thread (write + hash + wait)", write._Blocks.tofile)
W = {}
def phase(f):  # the write phase's wall and process CPU time: how busy both cores are while tensors stream
    def g(*a, **k):
        W["t0"], W["c0"] = time.perf_counter(), time.process_time()
        try:
            return f(*a, **k)
        finally:
            W["wall"], W["cpu"] = time.perf_counter() - W["t0"], time.process_time() - W["c0"]
    return g
write.write_gguf = phase(write.write_gguf)
from mlx_bridge.cli import main
t0 = time.perf_counter()
rc = main(["export", *sys.argv[1:], "--no-progress"])
wall = time.perf_counter() - t0
r = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "wall": wall, "user": r.ru_utime, "sys": r.ru_stime, "hwm_mb": hwm / 1024,
                  "parts": dict(T), "write": {"start": W["t0"] - t0, "wall": W["wall"], "cpu": W["cpu"]}}))
"""
GGUF_TOP = ["source hash (read + hash)", "blocks (total)", "writer thread (write + hash + wait)"]
GGUF_SUB = {"blocks (total)": ["  pread", "  LoRA fuse (float32)", "  NaN/Inf scan", "  quantize"],
            "writer thread (write + hash + wait)": ["  output hash"]}

TOP = ["source hash (read + hash)", "output hash", "make chunks (total)", "whole tensors (materialize)",
       "write (syscalls)"]


def profile(work: Path, shape: str = "tinyllama", layout: str = "tree", repeat: int = 1, fmt: str = "hf",
            gguf_type: str = "q8_0") -> dict:
    """The profiled run with the least CPU time of `repeat`: {wall, user, sys, hwm_mb, load, parts}; parts are
    thread CPU seconds by part (TOP or GGUF_TOP, their sub-parts, "start-up (imports)") and, for hf, the bytes
    each hash hashed ("bytes source", "bytes output")."""
    gg = fmt == "gguf"
    base, ad = gguf_model_dirs(work, shape) if gg else model_dirs(work, shape, layout)
    best = None
    for r in range(repeat):
        out = work / f"out-profile-{r}"
        shutil.rmtree(out, ignore_errors=True)
        warm(base, ad)
        load = os.getloadavg()[0]
        cmd = ([GGUF_CHILD, str(ad), "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type] if gg
               else [CHILD, str(ad), str(out)])
        p = subprocess.run([sys.executable, "-c", *cmd], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"export failed ({p.returncode}):\n{p.stderr[-3000:]}")
        res = dict(json.loads(p.stdout.strip().splitlines()[-1]), load=load)
        shutil.rmtree(out)
        os.sync()
        if best is None or res["user"] + res["sys"] < best["user"] + best["sys"]:
            best = res
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--workdir", type=Path, required=True, help="benchmarks/export.py's --workdir (model reused)")
    ap.add_argument("--repeat", type=int, default=1, help="runs; the one with the least CPU time is shown")
    ap.add_argument("--layout", choices=["tree", "mlx", "names"], default="tree", help="as benchmarks/export.py's")
    ap.add_argument("--format", choices=["hf", "gguf"], default="hf")
    ap.add_argument("--gguf-type", default="q8_0", help="with --format gguf")
    args = ap.parse_args(argv)
    gg = args.format == "gguf"
    best = profile(args.workdir, args.shape, args.layout, args.repeat, args.format, args.gguf_type)
    cpu = best["user"] + best["sys"]
    parts = best["parts"]
    print(f"| {'part':34} | {'CPU s':>6} | {'share':>6} |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 8}|")
    top = GGUF_TOP if gg else TOP
    for name in top + ["rest: start-up, plan, tokenizer, manifest, Python"]:
        v = parts.get(name, 0.0) if name in top else cpu - sum(parts.get(k, 0.0) for k in top)
        print(f"| {name:34} | {v:6.2f} | {v / cpu:6.1%} |")
        for sub in GGUF_SUB.get(name, []) if gg else []:
            print(f"| {sub:34} | {parts.get(sub, 0.0):6.2f} | |")
        if gg:
            continue
        if name == "source hash (read + hash)":
            print(f"| {'  of which hashing':34} | {parts.get('  of which hashing', 0.0):6.2f} | |")
        if name.startswith("rest"):
            print(f"| {'  of which start-up (imports)':34} | {parts.get('start-up (imports)', 0.0):6.2f} | |")
        if name == "make chunks (total)":
            for sub in ("  pread", "  LoRA fuse (float32, rounded)", "  NaN/Inf scan"):
                print(f"| {sub:34} | {parts.get(sub, 0.0):6.2f} | |")
    print(f"| {'process (user + sys)':34} | {cpu:6.2f} | {1:6.1%} |")
    print(f"\nshape {args.shape}{f' gguf {args.gguf_type}' if gg else ''}: wall {best['wall']:.2f} s (after imports), user {best['user']:.2f} s + sys "
          f"{best['sys']:.2f} s, peak RSS (VmHWM) {best['hwm_mb']:.0f} MB, load average {best['load']:.1f} at the start, "
          f"{os.cpu_count()} CPUs; least CPU of {args.repeat}. Thread CPU of the wrapped parts (they overlap in "
          "time on the cores, not in CPU seconds).")
    if gg:
        wr = best["write"]
        print(f"The GGUF file is written from {wr['start']:.2f} s after the export starts, in {wr['wall']:.2f} s wall "
              f"and {wr['cpu']:.2f} CPU s ({wr['cpu'] / wr['wall']:.2f} cores busy).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
