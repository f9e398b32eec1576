"""The export's floor on this machine: the CPU seconds that cannot go, and the wall time with perfect overlap.

The export with every check does three kinds of work: sha256 of every source and output byte (4.4 GB
for TinyLlama), the LoRA fuse, and moving the bytes (pread, write). This script measures, in one run:

- the sha256 rates of this CPU on one thread: `hashlib` (OpenSSL, one stream at a time, what the
  export uses) and a small SHA-NI kernel (built here with `cc`, checked against hashlib) hashing one
  stream, then two independent streams interleaved in the same thread (SHA-NI's round instruction
  has a latency of about twice its issue rate, so one stream leaves half of the unit idle; the source
  and the output of one chunk are two such streams);
- one profiled export (`export_profile.profile`): its CPU seconds, the part that is hashing, the bytes
  hashed and the single-threaded start-up;

and prints the wall time the export would take on the machine's cores with perfect overlap (start-up
alone, everything else spread over all cores): as it is, with the hashing at the two-stream rate, and
without any hashing. With `--fuse` it also times `mlx_lm.fuse --dequantize` (the benchmark's anchor)
in the same run and prints each floor as a fraction of it, beside the goal of issue 13 (0.10x).

    python benchmarks/export_floor.py --shape tinyllama --workdir /tmp/bench13 --fuse
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import GOAL, SHAPES, _uptime, measure, model_dirs, warm  # noqa: E402
from export_profile import profile  # noqa: E402

# SHA-256 block function on SHA-NI for N independent streams, one instruction stream: each step is done
# for every lane before the next, so the lanes' round instructions overlap in the pipeline.
KERNEL = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
static const uint32_t K[64] = {
0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,0xd807aa98,0x12835b01,
0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,
0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,
0x06ca6351,0x14292967,0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,0x19a4c116,0x1e376c08,
0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,
0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
#define LANES(N)                                                                                          \
void blocks_x##N(uint32_t *st, const uint8_t **d, size_t nblocks) {  /* st: N states of 8 words */        \
  const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);                     \
  __m128i S0[N], S1[N], W[N][16];                                                                         \
  for (int l = 0; l < N; l++) {                                                                           \
    __m128i t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i*)&st[8*l]), 0xB1);                       \
    __m128i s = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i*)&st[8*l + 4]), 0x1B);                   \
    S0[l] = _mm_alignr_epi8(t, s, 8); S1[l] = _mm_blend_epi16(s, t, 0xF0); }                              \
  for (size_t b = 0; b < nblocks; b++) {                                                                  \
    __m128i A0[N], A1[N];                                                                                 \
    for (int l = 0; l < N; l++) { A0[l] = S0[l]; A1[l] = S1[l]; }                                         \
    _Pragma("GCC unroll 16") for (int g = 0; g < 16; g++) {                                               \
      __m128i k = _mm_loadu_si128((const __m128i*)&K[4*g]);                                               \
      _Pragma("GCC unroll 4") for (int l = 0; l < N; l++) {                                               \
        if (g < 4) W[l][g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(d[l] + 64*b + 16*g)), MASK); \
        else W[l][g] = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(W[l][g-4], W[l][g-3]),    \
                                            _mm_alignr_epi8(W[l][g-1], W[l][g-2], 4)), W[l][g-1]);       \
        __m128i m = _mm_add_epi32(W[l][g], k);                                                            \
        S1[l] = _mm_sha256rnds2_epu32(S1[l], S0[l], m);                                                   \
        S0[l] = _mm_sha256rnds2_epu32(S0[l], S1[l], _mm_shuffle_epi32(m, 0x0E)); } }                      \
    for (int l = 0; l < N; l++) { S0[l] = _mm_add_epi32(S0[l], A0[l]); S1[l] = _mm_add_epi32(S1[l], A1[l]); } } \
  for (int l = 0; l < N; l++) {                                                                           \
    __m128i t = _mm_shuffle_epi32(S0[l], 0x1B), s = _mm_shuffle_epi32(S1[l], 0xB1);                       \
    _mm_storeu_si128((__m128i*)&st[8*l], _mm_blend_epi16(t, s, 0xF0));                                    \
    _mm_storeu_si128((__m128i*)&st[8*l + 4], _mm_alignr_epi8(s, t, 8)); } }
LANES(1)
LANES(2)
"""
IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]


# the export (argv: kernel, adapter, out) with every sha256 on the kernel and one hash thread for the source
# and the output: two updates of different files queued one after the other (a chunk's output bytes and
# the source bytes it was made from) are hashed as two lanes at once. hashlib's and ThreadPoolExecutor's
# interfaces, patched in as the profile patches its timers; the digests are checked against the plain run.
X2_CHILD = r"""
import collections, ctypes, json, sys, threading, time
from concurrent.futures import Future
import numpy as np
import mlx_bridge.fsutil as fs, mlx_bridge.translate.source_hash as sh

LIB = ctypes.CDLL(sys.argv[1])
IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]
VP = ctypes.c_void_p
PAIRED = [0, 0, 0.0]  # bytes hashed two lanes at once, one lane; thread CPU of the hash thread

def addr(mv):
    return np.frombuffer(mv, np.uint8).ctypes.data if mv.nbytes else 0

class Sha256:
    '''hashlib.sha256's update/hexdigest on the kernel (whole blocks; a partial one waits in `tail`).'''
    def __init__(self, data=b""):
        self.st, self.n, self.tail = np.array(IV, np.uint32), 0, b""
        if data:
            self.update(data)
    def update(self, data):
        mv = memoryview(data).cast("B")
        self.n += mv.nbytes
        PAIRED[1] += mv.nbytes
        if self.tail:
            k = min(64 - len(self.tail), mv.nbytes)
            self.tail += bytes(mv[:k])
            mv = mv[k:]
            if len(self.tail) < 64:
                return
            b = np.frombuffer(self.tail, np.uint8)
            LIB.blocks_x1(VP(self.st.ctypes.data), (VP * 1)(b.ctypes.data), ctypes.c_size_t(1))
            self.tail = b""
        whole = mv.nbytes // 64
        if whole:
            LIB.blocks_x1(VP(self.st.ctypes.data), (VP * 1)(addr(mv)), ctypes.c_size_t(whole))
        self.tail = bytes(mv[whole * 64:])
    def hexdigest(self):
        st, bits = self.st.copy(), self.n * 8
        pad = self.tail + b"\x80" + b"\0" * ((55 - len(self.tail)) % 64) + bits.to_bytes(8, "big")
        b = np.frombuffer(pad, np.uint8)
        LIB.blocks_x1(VP(st.ctypes.data), (VP * 1)(b.ctypes.data), ctypes.c_size_t(len(pad) // 64))
        return st.astype(">u4").tobytes().hex()

def pair(a, da, b, db):
    '''a.update(da); b.update(db), their common whole blocks two lanes at once.'''
    da, db = memoryview(da).cast("B"), memoryview(db).cast("B")
    for h, d in ((a, da), (b, db)):  # complete a partial block first: each stream on its block boundary
        if h.tail:
            k = min(64 - len(h.tail), d.nbytes)
            h.update(d[:k])
            if h is a:
                da = da[k:]
            else:
                db = db[k:]
    k = min(da.nbytes, db.nbytes) // 64
    if k and not a.tail and not b.tail:
        st = np.concatenate([a.st, b.st])
        LIB.blocks_x2(VP(st.ctypes.data), (VP * 2)(addr(da), addr(db)), ctypes.c_size_t(k))
        a.st[:], b.st[:] = st[:8], st[8:]
        a.n += 64 * k; b.n += 64 * k
        PAIRED[0] += 128 * k
        da, db = da[64 * k:], db[64 * k:]
    a.update(da)
    b.update(db)

def _hash_update(task):
    fn, args, kw, _ = task
    return getattr(fn, "__func__", None) is Sha256.update and len(args) == 1 and not kw

class PairPool:
    '''One thread for every hash: two adjacent updates of different hashes run as two lanes.'''
    def __init__(self):
        self.q, self.cv = collections.deque(), threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="sha256-pairs").start()
    def submit(self, fn, *args, **kw):
        fut = Future()
        with self.cv:
            self.q.append((fn, args, kw, fut))
            self.cv.notify()
        return fut
    def shutdown(self, wait=True, cancel_futures=False):
        if wait:
            self.submit(lambda: None).result()
    def _run(self):
        while True:
            with self.cv:
                while not self.q:
                    self.cv.wait()
                if len(self.q) == 1 and _hash_update(self.q[0]):  # its pair is usually a few microseconds behind
                    self.cv.wait(0.0005)
                t = self.q.popleft()
                u = self.q.popleft() if (self.q and _hash_update(t) and _hash_update(self.q[0])
                                         and self.q[0][0].__self__ is not t[0].__self__) else None
            c = time.thread_time()
            try:
                if u is not None:
                    pair(t[0].__self__, t[1][0], u[0].__self__, u[1][0])
                    t[3].set_result(None)
                    u[3].set_result(None)
                else:
                    t[3].set_result(t[0](*t[1], **t[2]))
            except BaseException as e:
                t[3].set_exception(e)
                if u is not None:
                    u[3].set_exception(e)
            PAIRED[2] += time.thread_time() - c

POOL = PairPool()
fs.hashlib = sh.hashlib = type("hashlib", (), {"sha256": Sha256})
for cls in (fs.StreamHasher, sh.SourceHasher):
    def init(self, *a, _orig=cls.__init__, **k):
        _orig(self, *a, **k)
        self._pool.shutdown()
        self._pool = POOL
    cls.__init__ = init

from mlx_bridge.cli import main
rc = main(["export", sys.argv[2], "--out", sys.argv[3], "--no-progress"])
with open(sys.argv[4], "w") as f:
    json.dump({"paired": PAIRED[0], "single": PAIRED[1], "hash_cpu": PAIRED[2]}, f)
"""

def sha_ni_kernel(tmp: Path):
    """The kernel as a ctypes library, or the reason there is none (no SHA-NI, no C compiler)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " sha_ni" not in flags:
        return "this CPU has no SHA-NI"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc) to build the SHA-NI kernel"
    (tmp / "k.c").write_text(KERNEL)
    p = subprocess.run([cc, "-O3", "-msha", "-mssse3", "-msse4.1", "-shared", "-fPIC", "-o", str(tmp / "k.so"),
                        str(tmp / "k.c")], capture_output=True, text=True)
    if p.returncode != 0:
        return f"the SHA-NI kernel did not build: {p.stderr.strip()[:200]}"
    return ctypes.CDLL(str(tmp / "k.so"))


def ni_digests(lib, bufs: list[np.ndarray]) -> tuple[list[str], float]:
    """(hex sha256 of each buffer, thread CPU seconds of the block function) with len(bufs) lanes at once;
    buffers of equal whole blocks (the padding block is hashed by a one-lane call, untimed)."""
    n = len(bufs)
    st = np.array(IV * n, np.uint32)
    ptrs = (ctypes.c_void_p * n)(*[b.ctypes.data for b in bufs])
    fn = getattr(lib, f"blocks_x{n}")
    c = time.thread_time()
    fn(st.ctypes.data_as(ctypes.c_void_p), ptrs, ctypes.c_size_t(bufs[0].nbytes // 64))
    secs = time.thread_time() - c
    out = []
    for l in range(n):  # the padding block: 0x80, zeros, the length in bits (big-endian)
        pad = np.zeros(64, np.uint8)
        pad[0] = 0x80
        pad[56:] = np.frombuffer((bufs[l].nbytes * 8).to_bytes(8, "big"), np.uint8)
        s = st[8 * l: 8 * l + 8].copy()
        lib.blocks_x1(s.ctypes.data_as(ctypes.c_void_p), (ctypes.c_void_p * 1)(pad.ctypes.data), ctypes.c_size_t(1))
        out.append(s.astype(">u4").tobytes().hex())
    return out, secs


def hash_rates(lib, nbytes: int = 256 << 20, repeat: int = 3) -> dict[str, float | str]:
    """GB/s of one thread: hashlib, and the SHA-NI kernel `lib` with one and two lanes (or why there is none)."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, nbytes, np.uint8) for _ in range(2))
    want = [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()]
    best = {}
    for _ in range(repeat):
        c = time.thread_time()
        h = hashlib.sha256()
        for i in range(0, nbytes, 1 << 20):  # the export's update size (one chunk of the writer)
            h.update(a[i: i + (1 << 20)])
        best["hashlib"] = min(best.get("hashlib", 1e9), time.thread_time() - c)
    if isinstance(lib, str):
        return {"hashlib": nbytes / best["hashlib"] / 1e9, "why": lib}
    for _ in range(repeat):
        d1, s1 = ni_digests(lib, [a])
        d1b, s1b = ni_digests(lib, [b])
        d2, s2 = ni_digests(lib, [a, b])
        if [d1[0], d1b[0]] != want or d2 != want:
            raise SystemExit("the SHA-NI kernel's digests differ from hashlib's")
        best["1 lane"] = min(best.get("1 lane", 1e9), (s1 + s1b) / 2)
        best["2 lanes"] = min(best.get("2 lanes", 1e9), s2 / 2)
    return {k: nbytes / v / 1e9 for k, v in best.items()}


PLAIN = "import sys; from mlx_bridge.cli import main; sys.exit(main(['export', *sys.argv[1:], '--no-progress']))"


def ab(work: Path, shape: str, kernel: Path, repeat: int) -> tuple[dict[str, list[tuple[float, float, float]]], dict]:
    """The export as it is and with the 2-lane hash (X2_CHILD), run alternately `repeat` times each:
    ({name: [(seconds, CPU s, load at the start)]}, the 2-lane hash thread's figures of its run with the
    least CPU: bytes paired, bytes hashed one lane, thread CPU); the digests its manifest records must
    be the export's own."""
    base, ad = model_dirs(work, shape)
    runs: dict[str, list] = {"as it is": [], "2-lane SHA-NI hash": []}
    stats, least = {}, None
    manifests = {}
    for r in range(repeat):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            x = work / f"out-floor-{r}-{len(manifests)}"
            shutil.rmtree(x, ignore_errors=True)
            warm(base, ad)
            load = os.getloadavg()[0]
            cmd = ([sys.executable, "-c", PLAIN, str(ad), "--out", str(x)] if name == "as it is" else
                   [sys.executable, "-c", X2_CHILD, str(kernel), str(ad), str(x), str(work / "x2-stats.json")])
            secs, _, cpu = measure(cmd)
            if name != "as it is" and (least is None or cpu < least):
                stats, least = json.loads((work / "x2-stats.json").read_text()), cpu
            m = json.loads((x / "manifest.json").read_text())
            manifests[name] = (m["files"], m["export"]["source_sha256"])
            runs[name].append((secs, cpu, load))
            shutil.rmtree(x)
            os.sync()
        if len(set(map(json.dumps, manifests.values()))) != 1:
            raise SystemExit("the 2-lane hash recorded other sha256 than the export's own")
    return runs, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--workdir", type=Path, required=True, help="benchmarks/export.py's --workdir (model reused)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each export; the least CPU / wall is shown")
    ap.add_argument("--fuse", action="store_true", help="also time mlx_lm.fuse --dequantize (the anchor) once")
    args = ap.parse_args(argv)
    print(f"uptime at start: {_uptime()}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        lib = sha_ni_kernel(Path(t))
        rates = hash_rates(lib)
        best = profile(args.workdir, args.shape, "tree", args.repeat)
        runs, stats = (None, {}) if isinstance(lib, str) else ab(args.workdir, args.shape, Path(lib._name), args.repeat)
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
    hashing = parts.get("  of which hashing", 0.0) + parts.get("sha256 output", 0.0)
    start = parts.get("start-up (imports)", 0.0)

    def floor(total: float) -> float:
        return start + (total - start) / cores

    def ratio(secs: float) -> str:
        return f" {secs / fuse:8.3f}x |" if fuse else ""

    print("sha256 on one thread of this CPU (GB/s): " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"SHA-NI kernel: none ({v})" for k, v in rates.items()))
    print(f"profiled export: {cpu:.2f} CPU s, of which hashing {hashing:.2f} ({hashed / 1e9:.2f} GB, "
          f"{hashed / 1e9 / max(hashing, 1e-9):.2f} GB/s) and start-up {start:.2f}; load {best['load']:.1f}\n")
    rows = [("as it is", cpu), ("hashing at hashlib's rate, nothing else changed", cpu - hashing + hashed / 1e9 / rates["hashlib"])]
    if "2 lanes" in rates:
        rows.append(("source + output hashed as 2 lanes of SHA-NI", cpu - hashing + hashed / 1e9 / rates["2 lanes"]))
    rows.append(("no hashing at all (lower bound)", cpu - hashing))
    print(f"| {'the profiled export, its CPU s recomputed':48} | {'CPU s':>6} | {f'wall on {cores} cores, perfect overlap':>34} |"
          + (f" {'x of fuse':>9} |" if fuse else ""))
    print(f"|{'-' * 50}|{'-' * 8}|{'-' * 36}|" + ("-" * 11 + "|" if fuse else ""))
    for name, total in rows:
        print(f"| {name:48} | {total:6.2f} | {floor(total):34.2f} |" + ratio(floor(total)))
    if runs:
        print(f"\n| {'measured, run alternately':26} | {'seconds':>7} | {'CPU s':>6} | {'load':>9} |" + (f" {'x of fuse':>9} |" if fuse else ""))
        print(f"|{'-' * 28}|{'-' * 9}|{'-' * 8}|{'-' * 11}|" + ("-" * 11 + "|" if fuse else ""))
        for name, v in runs.items():
            secs, c = min(r[0] for r in v), min(r[1] for r in v)
            loads = [r[2] for r in v]
            print(f"| {name:26} | {secs:7.2f} | {c:6.2f} | {min(loads):4.1f}-{max(loads):<4.1f} |" + ratio(secs))
        print(f"\nthe 2-lane hash thread: {stats['hash_cpu']:.2f} CPU s for {(stats['paired'] + stats['single']) / 1e9:.2f} GB "
              f"({stats['paired'] / 1e9:.2f} GB as pairs), against {hashing:.2f} for the export's two hash threads")
    if fuse:
        print(f"\nmlx_lm.fuse --dequantize: {fuse:.2f} s in this run; the goal {GOAL:.2f}x is {GOAL * fuse:.2f} s.")
    print(f"\nshape {args.shape}, {cores} CPUs. Perfect overlap: the start-up (imports, one thread) plus the rest of the "
          "CPU seconds spread evenly over every core, the least wall time any scheduling of this work can take. "
          "Measured: `mlx-bridge export AD --out X --no-progress` and the same with every sha256 on the 2-lane kernel "
          f"(one hash thread; the same digests recorded), least seconds and least CPU of {args.repeat}, whole "
          "process (start-up included). CPU seconds swing with the machine's load: quote them with it.")
    return 0

if __name__ == "__main__":
    sys.exit(main())
