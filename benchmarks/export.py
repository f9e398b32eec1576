"""Export speed and memory: `mlx-bridge export` against `mlx_lm.fuse --dequantize` and `cp -r`, in one run.

Builds a random bf16 llama of the chosen shape directly as MLX-layout safetensors (numpy; no model is
run) with a rank-16 LoRA adapter on every linear layer of every block (`adapters.safetensors` +
`adapter_config.json` as mlx-lm writes them), then runs each tool as a child process and measures its
wall time and peak resident memory (its process tree, polled every 20 ms from /proc: the largest sum of
VmRSS or the largest single VmHWM).

    python benchmarks/export.py --shape tiny                 # seconds, for development
    python benchmarks/export.py --shape tinyllama            # TinyLlama-1.1B shape, ~2.2 GB bf16
    python benchmarks/export.py --shape llama7b --workdir /big/disk   # ~13.5 GB
    python benchmarks/export.py --shape tinyllama --layout mlx        # the base's data in MLX's file order
    python benchmarks/export.py --format gguf --shape tinyllama                  # GGUF vs llama.cpp's quantizer
    python benchmarks/export.py --format gguf --shape llama3-8b-1layer           # a 128256 x 4096 embedding

Every tool runs on a warm page cache (the inputs are read once before each run; dropping the cache
needs root), and the outputs are timed into the page cache (no fsync; `sync` runs untimed between tools).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_bridge.formats import StreamWriter, TensorSpec  # noqa: E402
from mlx_bridge.hashing import DEFAULT  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "llama7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
    # Llama-3-8B's widths and vocabulary, one block: its 128256 x 4096 embedding and output (2.1 GB each in float32)
    "llama3-8b-1layer": dict(hidden_size=4096, num_hidden_layers=1, intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256),
}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
RANK, SCALE = 16, 20.0
MAX_SHARD = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
GOAL = 0.10  # issue 13: export (hf), every check on, in at most this fraction of mlx_lm.fuse's time


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a llama in mlx-lm's layout (HF names), in mlx-lm's save order."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Random bf16 bits (float32 normal, truncated to its top 16 bits), as uint16."""
    x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * np.float32(std)
    return (x.view(np.uint32) >> 16).astype(np.uint16).reshape(shape)


def mlx_order(names: list[str]) -> list[str]:
    """`names` in the order `mx.save_safetensors` lays their data out in a file (its hash map's order)."""
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as t:
        mx.save_safetensors(f"{t}/x.safetensors", {n: mx.zeros((1,)) for n in names})
        with open(f"{t}/x.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def write_shards(d: Path, tensors: list[tuple[str, tuple[int, ...]]], make, layout: str = "tree") -> int:
    """Greedy 5 GB shards as mlx-lm fills them (+ index); `make(name, shape)` gives each tensor's bytes.
    `layout`: each shard's data in mlx-lm's parameter order ("tree"), in the order `mx.save_safetensors`
    writes it ("mlx", what `mlx_lm.convert` and `fuse` leave), or by name ("names", what HF's safetensors
    writes: a bf16 HF checkpoint mlx-lm loads as it is)."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if cur and size + n > MAX_SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        if layout != "tree":
            dims = dict(shard)
            shard = [(n, dims[n]) for n in (mlx_order(list(dims)) if layout == "mlx" else sorted(dims))]
        specs = [TensorSpec(n, "BF16", s) for n, s in shard]
        with StreamWriter(d / fname, specs, {"format": "mlx"}) as w:
            for n, s in shard:
                w.write(n, make(n, s).reshape(-1).view(np.uint8).data)
                weight_map[n] = fname
                total += int(np.prod(s)) * 2
    idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx, indent=4))
    return total


def build_base(d: Path, shape: str, seed: int = 0, layout: str = "tree") -> int:
    """The bf16 base model dir (config, tokenizer, generation config, shards); returns weight bytes."""
    from mlx_bridge.testing import tiny_tokenizer

    c = SHAPES[shape]
    d.mkdir(parents=True)
    tok = tiny_tokenizer(d)
    config = dict(c, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, torch_dtype="bfloat16", bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    (d / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_token_id,
                                                          "eos_token_id": tok.eos_token_id}))
    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm.weight"):  # bf16 1.0 = 0x3F80
            return np.full(shape, 0x3F80, np.uint16)
        return random_bf16(rng, shape, 0.02)

    return write_shards(d, llama_tensors(c), make, layout)


def build_adapter(d: Path, base: Path, shape: str, seed: int = 1) -> int:
    """Rank-16 LoRA on every linear of every block, float32, as mlx-lm saves it; returns bytes."""
    from mlx_lm.utils import save_config

    from mlx_bridge.formats import save_file
    from mlx_bridge.testing.adapters import lora_args

    c = SHAPES[shape]
    dims = dict(llama_tensors(c))
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    tensors = {}
    for l in range(c["num_hidden_layers"]):
        for m in LINEARS:
            out_dim, in_dim = dims[f"model.layers.{l}.{m}.weight"]
            k = f"model.layers.{l}.{m}"
            tensors[f"{k}.lora_a"] = (rng.uniform(-1, 1, (in_dim, RANK)) / np.sqrt(in_dim)).astype(np.float32)
            tensors[f"{k}.lora_b"] = rng.standard_normal((RANK, out_dim), dtype=np.float32) * np.float32(1e-3)
    save_file(dict(sorted(tensors.items())), d / "adapters.safetensors", {})
    lp = {"rank": RANK, "dropout": 0.0, "scale": SCALE, "keys": LINEARS}
    save_config(lora_args(base, d, "lora", c["num_hidden_layers"], lp), d / "adapter_config.json")
    return sum(t.nbytes for t in tensors.values())


def model_dirs(work: Path, shape: str, layout: str = "tree") -> tuple[Path, Path]:
    """(base, adapter) of `shape` under `work`, built unless a previous run left them complete."""
    tag = shape if layout == "tree" else f"{shape}-{layout}"
    base, ad = work / f"base-{tag}", work / f"adapter-{tag}"
    if not (base / "model.safetensors.index.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        build_base(base, shape, layout=layout)
    if not (ad / "adapter_config.json").exists():
        shutil.rmtree(ad, ignore_errors=True)
        build_adapter(ad, base, shape)
    return base, ad


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def compile_package() -> None:
    """Byte-compile mlx_bridge once, as an installed package is (pip compiles at install, and Python caches
    what it imports): in a source tree run with PYTHONDONTWRITEBYTECODE=1, every timed run of the export
    would compile its modules again (about 45 ms on the 2-core box), a cost no installed tool pays and
    mlx-lm's fuse, compiled in site-packages, does not pay either."""
    subprocess.run([sys.executable, "-c", "import compileall, os, mlx_bridge; "  # the package the tools import
                    "compileall.compile_dir(os.path.dirname(mlx_bridge.__file__), quiet=1)"], check=True)


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """Run `cmd`; return (seconds, peak RSS in MB of its process tree, CPU seconds user+sys).

    Polled every 20 ms from /proc: the largest sum of the tree's VmRSS, or the largest single VmHWM (each
    program's own high-water mark, which exec resets; wait4's ru_maxrss would report this benchmark's own
    size, inherited at fork). The tree's members are looked up every 200 ms.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = 0, threading.Event()

    def poll():  # the tree from all of /proc every 10th poll only: a scan costs ~2.4 ms, and every 20 ms it took
        nonlocal peak  # 11% of a core from the tool measured (a tool on both cores lost ~0.13 s in 2.5 s)
        pids, n = [p.pid], 0
        while not done.is_set():
            if n % 10 == 0:
                pids = _tree(p.pid)
            n += 1
            mem = [_mem_kb(q) for q in pids]
            peak = max(peak, sum(r for r, _ in mem), max((h for _, h in mem), default=0))
            done.wait(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    err = p.stderr.read().decode(errors="replace")
    p.wait()
    secs = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return secs, peak / 1024, cpu


# the export with its checks stubbed out (hashes of source and output, NaN/Inf scan): what they cost
NO_CHECKS = """
import sys
from concurrent.futures import Future
import mlx_bridge.translate.export as ex, mlx_bridge.translate.plan as plan
import mlx_bridge.translate.chunks as chunks, mlx_bridge.translate.parts as parts
class NoHash:
    def update(self, *a, **k): return None
    def digests(self): return {}
    def close(self): pass
class NoSourceHash:
    def __init__(self, paths, algo=None): self.paths = paths
    def expect(self, spans): pass
    def feed(self, *a): return None
    def finish(self, stop=None):
        f = Future()
        f.set_result("blake3:" + "0" * 64)
        return {p: f for p in self.paths}
    def close(self): pass
ex.hash_file = lambda p, *a, **k: "blake3:" + "0" * 64
ex.StreamHasher = NoHash
ex.SourceHasher = NoSourceHash
plan.count_nonfinite = chunks.count_nonfinite = parts.count_nonfinite = lambda a: 0
from mlx_bridge.cli import main
sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2], "--no-verify"]))
"""


def checks_breakdown(work: Path, shape: str, layout: str) -> str:
    """Each check's thread CPU seconds in one profiled export (`export_profile.py`), and the hash rates."""
    from export_profile import profile

    from mlx_bridge.hashing import ALGORITHMS

    parts = profile(work, shape, layout)["parts"]
    src, out = parts.get("  of which hashing", 0.0), parts.get("output hash", 0.0)
    rates = hash_rates()
    hashed = (parts.get("bytes source", 0) + parts.get("bytes output", 0)) / 1e9
    return (f"  of which (thread CPU of one profiled export, benchmarks/export_profile.py): {DEFAULT} of the source "
            f"{src:.2f} s ({parts.get('bytes source', 0) / 1e9:.2f} GB), of the output {out:.2f} s "
            f"({parts.get('bytes output', 0) / 1e9:.2f} GB), NaN/Inf scan {parts.get('  NaN/Inf scan', 0.0):.2f} s; "
            "one thread here hashes " + ", ".join(f"{a} at {rates[a]:.2f} GB/s" for a in ALGORITHMS)
            + f", so the hashing alone is {hashed / rates[DEFAULT]:.2f} CPU s in {DEFAULT} "
            + ", ".join(f"({hashed / rates[a]:.2f} in {a})" for a in ALGORITHMS if a != DEFAULT)
            + " (the floor with and without it: benchmarks/export_floor.py)")


def hash_rates(nbytes: int = 256 << 20) -> dict[str, float]:
    """GB/s of each of `mlx_bridge.hashing.ALGORITHMS` on one thread (best of 3, thread CPU time)."""
    from mlx_bridge.hashing import ALGORITHMS

    buf, rates = np.full(nbytes, 0x5A, np.uint8), {}  # written: zeros would all read one shared zero page
    for name, make in ALGORITHMS.items():
        best = 1e9
        for _ in range(3):
            h, c = make(), time.thread_time()
            h.update(buf)
            best = min(best, time.thread_time() - c)
        rates[name] = nbytes / best / 1e9
    return rates


def warm(*dirs: Path) -> None:
    for d in dirs:
        for f in Path(d).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def dir_bytes(d: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in Path(d).glob(pattern))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--workdir", type=Path, help="where to build and write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built base/adapter in the work dir (and reuse them)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is shown")
    ap.add_argument("--layout", choices=["tree", "mlx", "names"], default="tree",
                    help="order of the base's tensors in its file: mlx-lm's parameter order (tree), as "
                         "mx.save_safetensors writes them (mlx), or by name as HF's safetensors does (names)")
    ap.add_argument("--format", choices=["hf", "gguf"], default="hf",
                    help="gguf: q4_k_m / q8_0 export against llama.cpp's llama_model_quantize from an f16 GGUF")
    args = ap.parse_args(argv)
    if args.format == "gguf":
        return gguf_main(args)

    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"bench-export-{args.shape}-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base, ad = model_dirs(work, args.shape, args.layout)
    model_bytes = dir_bytes(base, "model*.safetensors")
    print(f"{args.shape} ({args.layout} layout): base {model_bytes / 1e9:.2f} GB bf16, adapter {dir_bytes(ad, 'adapters.safetensors') / 1e6:.1f} MB "
          f"(rank {RANK}, {len(LINEARS)} linears x {SHAPES[args.shape]['num_hidden_layers']} layers); "
          f"built in {time.perf_counter() - t:.0f} s under {work}", flush=True)

    bridge = str(Path(sys.executable).with_name("mlx-bridge"))
    compile_package()
    tools = {  # name -> (command for output dir X, glob of the weight files it writes)
        "mlx_lm.fuse --dequantize": (lambda x: [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base),
                                                "--adapter-path", str(ad), "--save-path", str(x), "--dequantize"],
                                     "model*.safetensors"),
        "cp -r base": (lambda x: ["cp", "-r", str(base), str(x)], "model*.safetensors"),
        "mlx-bridge export (hf)": (lambda x: [bridge, "export", str(ad), "--out", str(x)], "model*.safetensors"),
        "export (hf), checks off": (lambda x: [sys.executable, "-c", NO_CHECKS, str(ad), str(x)], "model*.safetensors"),
        "mlx-bridge export (peft)": (lambda x: [bridge, "export", str(ad), "--out", str(x), "--format", "peft"],
                                     "adapter_model.safetensors"),
    }
    rows, load0 = {}, os.getloadavg()[0]
    print(f"uptime at start: {_uptime()}", flush=True)
    for name, (cmd, pattern) in tools.items():
        best = None
        for r in range(args.repeat):
            x = work / ("out-" + "".join(c if c.isalnum() else "_" for c in name) + f"-{r}")
            shutil.rmtree(x, ignore_errors=True)
            warm(base, ad)
            load = os.getloadavg()[0]
            secs, rss, cpu = measure(cmd(x))
            written = dir_bytes(x, pattern)
            if written == 0:
                raise SystemExit(f"{name}: wrote no {pattern} under {x}")
            if best is None or secs < best[0]:
                best = (secs, rss, written, cpu, load)
            shutil.rmtree(x)  # kept outputs would fill the page cache and slow the next tool
            os.sync()
        rows[name] = best
        print(f"  {name}: {best[0]:.2f} s", flush=True)

    t_fuse, t_cp = rows["mlx_lm.fuse --dequantize"][0], rows["cp -r base"][0]
    print(f"uptime at end: {_uptime()}")
    print()
    print(f"| {'tool':26} | {'seconds':>8} | {'CPU s':>6} | {'peak RSS MB':>11} | {'GB/s':>6} | {'fuse / this':>11} "
          f"| {'this / cp':>9} | {'load':>4} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 8}|{'-' * 13}|{'-' * 8}|{'-' * 13}|{'-' * 11}|{'-' * 6}|")
    for name, (secs, rss, written, cpu, load) in rows.items():
        print(f"| {name:26} | {secs:8.2f} | {cpu:6.1f} | {rss:11.0f} | {written / 1e9 / secs:6.2f} | {t_fuse / secs:10.1f}x | "
              f"{secs / t_cp:8.2f}x | {load:4.1f} |")
    on, off = rows["mlx-bridge export (hf)"], rows["export (hf), checks off"]
    print(f"\nchecks ({DEFAULT} of every source and output byte, NaN/Inf scan of every tensor): "
          f"{on[0] - off[0]:+.2f} s wall ({on[3] - off[3]:+.1f} CPU s, {on[1] - off[1]:+.0f} MB peak RSS)")
    print(checks_breakdown(work, args.shape, args.layout))
    print(f"export (hf) / mlx_lm.fuse: {on[0] / t_fuse:.3f}x with every check (goal <= {GOAL:.2f}x: "
          f"{'met' if on[0] / t_fuse <= GOAL else 'NOT met'}), {off[0] / t_fuse:.3f}x with checks off; "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"\nshape {args.shape} ({model_bytes / 1e9:.2f} GB bf16 weights), {os.cpu_count()} CPUs, best of "
          f"{args.repeat}. Warm page cache for every tool (inputs read before each run; no root to drop it); "
          "outputs timed into the page cache (sync untimed between tools). GB/s = weight bytes written / "
          "seconds (peft writes only the adapter). CPU s = user+sys of the tool's process tree; load = 1-minute "
          "load average when the run started (other work on the machine slows wall times). Peak RSS: process tree polled every 20 ms (max of summed "
          "VmRSS and of each process's VmHWM). mlx_bridge byte-compiled before timing, as an installed package is. "
          "Targets (issue 2): export >= 10x faster than fuse, <= 3x cp, RSS < 1 GB.")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)
    return 0


# --format gguf: our GGUF export against llama.cpp's quantizer, in the same run

QUANTIZE = """import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"""


GGUF_VOCAB = {"llama3-8b-1layer": "llama-bpe"}  # llama.cpp's vocab file per shape (default: llama-spm, 32000 tokens)


def build_base_gguf(d: Path, shape: str) -> int:
    """The bf16 base of `shape` with a real vocabulary (llama.cpp's models/ggml-vocab-*.gguf: TinyLlama's
    32000-token SentencePiece, or Llama 3's byte-level BPE): the tiny word-level tokenizer has no GGUF form."""
    from mlx_bridge.testing.gguf import hf_tokenizer, vocab_file

    n = build_base(d, shape)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    hf_tokenizer(vocab_file(GGUF_VOCAB.get(shape, "llama-spm")), d)
    return n


def _vocab_size(shape: str) -> int:
    import gguf

    from mlx_bridge.testing.gguf import vocab_file

    return len(gguf.GGUFReader(vocab_file(GGUF_VOCAB.get(shape, "llama-spm"))).fields["tokenizer.ggml.tokens"].data)


def gguf_model_dirs(work: Path, shape: str) -> tuple[Path, Path]:
    """(base, adapter) of `shape` with its real vocabulary under `work`, built unless a previous run left them."""
    SHAPES[shape] = dict(SHAPES[shape], vocab_size=_vocab_size(shape))  # the real vocabulary's size
    base, ad = work / f"base-gguf-{shape}", work / f"adapter-gguf-{shape}"
    if not (base / "model.safetensors.index.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        build_base_gguf(base, shape)
    if not (ad / "adapter_config.json").exists():
        shutil.rmtree(ad, ignore_errors=True)
        build_adapter(ad, base, shape)
    return base, ad


# the GGUF export with its checks stubbed out (hashes of source and output, NaN/Inf scan)
GGUF_NO_CHECKS = """
import sys
import mlx_bridge.translate.export as ex, mlx_bridge.translate.parts as parts
from mlx_bridge.translate.gguf import write
ex.hash_file = lambda p, *a, **k: "blake3:" + "0" * 64
parts.count_nonfinite = lambda a: 0
class NoHash:
    def update(self, b): pass
    def value(self): return "blake3:" + "0" * 64
write.Hasher = NoHash
from mlx_bridge.cli import main
sys.exit(main(["export", *sys.argv[1:]]))
"""


def gguf_main(args) -> int:
    """Export q8_0 / q4_k_m (fused in float32, quantized in numpy) vs llama_model_quantize from an f16 GGUF."""
    from mlx_bridge.translate.gguf import GGUF_TYPES

    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"bench-gguf-{args.shape}-"))
    work.mkdir(parents=True, exist_ok=True)
    base, ad = gguf_model_dirs(work, args.shape)
    c = SHAPES[args.shape]
    print(f"{args.shape}: base {dir_bytes(base, 'model*.safetensors') / 1e9:.2f} GB bf16 + rank-{RANK} LoRA on every "
          f"linear; largest tensor {c['vocab_size']} x {c['hidden_size']} ({c['vocab_size'] * c['hidden_size'] * 4 / 1e9:.2f} "
          f"GB in float32); under {work}", flush=True)
    print(f"uptime at start: {_uptime()}", flush=True)
    bridge = str(Path(sys.executable).with_name("mlx-bridge"))
    compile_package()
    f16 = work / "out-f16"
    shutil.rmtree(f16, ignore_errors=True)

    def ours(t):
        return lambda x: [bridge, "export", str(ad), "--out", str(x), "--format", "gguf", "--gguf-type", t, "--no-progress"]

    def theirs(t):
        return lambda x: ["bash", "-c", f'mkdir -p "{x}" && "{sys.executable}" -c "$0" "{f16}/model-f16.gguf" '
                          f'"{x}/model-{t}.gguf" {int(GGUF_TYPES[t][0])}', QUANTIZE]

    def no_checks(t):
        return lambda x: [sys.executable, "-c", GGUF_NO_CHECKS, str(ad), "--out", str(x), "--format", "gguf",
                          "--gguf-type", t, "--no-progress"]

    tools = {"mlx-bridge export gguf f16": (ours("f16"), None),
             "mlx-bridge export gguf q8_0": (ours("q8_0"), "q8_0"),
             "  same, checks off": (no_checks("q8_0"), "q8_0"),
             "llama_model_quantize f16->q8_0": (theirs("q8_0"), None),
             "mlx-bridge export gguf q4_k_m": (ours("q4_k_m"), "q4_k_m"),
             "llama_model_quantize f16->q4_k_m": (theirs("q4_k_m"), None)}
    rows = {}
    for name, (cmd, _) in tools.items():
        x = f16 if name.endswith("f16") else work / ("out-" + "".join(c if c.isalnum() else "_" for c in name))
        shutil.rmtree(x, ignore_errors=True) if x != f16 else None
        warm(f16) if name.startswith("llama") else warm(base, ad)
        load0 = os.getloadavg()[0]
        secs, rss, cpu = measure(cmd(x))
        rows[name] = (secs, rss, dir_bytes(x, "*.gguf"), cpu, load0, os.getloadavg()[0])
        print(f"  {name}: {secs:.2f} s", flush=True)
        if x != f16:
            shutil.rmtree(x)
        os.sync()
    print(f"uptime at end: {_uptime()}")
    print()
    print(f"| {'tool':34} | {'seconds':>8} | {'CPU s':>6} | {'peak RSS MB':>11} | {'GGUF MB':>8} | {'ours / llama.cpp':>16} "
          f"| {'load':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 8}|{'-' * 13}|{'-' * 10}|{'-' * 18}|{'-' * 11}|")
    for name, (secs, rss, written, cpu, load0, load1) in rows.items():
        ratio = ""
        if tools[name][1]:
            ref = rows["llama_model_quantize f16->" + tools[name][1]]
            ratio = f"{secs / ref[0]:.2f}x ({cpu / ref[3]:.2f}x CPU)"
        print(f"| {name:34} | {secs:8.2f} | {cpu:6.1f} | {rss:11.0f} | {written / 1e6:8.1f} | {ratio:>16} "
              f"| {load0:4.1f}-{load1:<4.1f} |")
    print(f"\nshape {args.shape}, {os.cpu_count()} CPUs. mlx-bridge reads the bf16 MLX model + adapter, fuses in float32 "
          "and quantizes in numpy; llama_model_quantize (nthread 2) reads the f16 GGUF written by the first row. "
          "ours / llama.cpp: wall (and CPU) time against llama.cpp's row of the same type. checks off: the same "
          "export without the manifest's hashes of the source and output files and the NaN/Inf scan (what they cost; "
          "llama.cpp does neither). Peak RSS: process tree "
          "polled every 20 ms. load: 1-minute load average at the start and end of the row (the machine is shared).")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
