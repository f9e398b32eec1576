"""Batch-1 decode variants of `FastRunner` on the same weights: the record of the tuning experiment.

Each variant patches the fast path (inductor options, decode attention, length buckets, or a runner
whose layers hand the residual on), compiles it fresh and times 256 tokens after a 128-token prompt
(median of 3). docs/gpu.md has the H200 numbers; only coordinate-descent tuning was kept.

    python benchmarks/decode_variants.py                     # CUDA, Llama-2-7B shape
    python benchmarks/decode_variants.py tiny base,resid     # CPU smoke run of two variants
"""
import statistics, sys, time, json, os
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from benchmarks.decode import build, bandwidth, prompts, sync
from mlx_bridge.deploy.runners import fast as fast_mod, fused as fm
from mlx_bridge.deploy.runners.fast import FastRunner
from mlx_bridge.deploy.runners.sampling import greedy

shape = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = dev.type == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
hf, native, cfg = build(shape, dtype, dev)
del hf
if cuda: torch.cuda.empty_cache()
bw = bandwidth(dev)
P, N = 128, 256

def cd_compile(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True, "coordinate_descent_tuning": True})


def plain_compile(fn):  # the setting before tuning: the "base" of the experiment
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})

def math_attend(q, kc, vc, mask, scale, softcap):
    if softcap is not None:
        return orig_attend(q, kc, vc, mask, scale, softcap)
    B, H, _, hd = q.shape
    g = H // kc.shape[1]
    qq = q.reshape(B, kc.shape[1], g, hd)
    s = torch.matmul(qq, kc.transpose(2, 3)).float() * scale + mask.float()
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, vc).reshape(B, H, 1, hd)

def eff_attend(q, kc, vc, mask, scale, softcap):
    from torch.nn.attention import sdpa_kernel, SDPBackend
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return orig_attend(q, kc, vc, mask, scale, softcap)

orig_compile, orig_attend, orig_len = plain_compile, fm._decode_attend, fast_mod.len_bucket
orig_grow = fast_mod.GROW_AHEAD


def len128(n, min_len=256):
    return max(min_len, -(-n // 128) * 128)

class ResidRunner(FastRunner):
    """layers hand (x, m) on; the residual add of one layer fuses into the next layer's first norm."""
    def _build_functions(self):
        super()._build_functions()
        spec = self.fused.spec
        eps, gemma = spec.eps, spec.gemma
        base = fm.make_layer(spec, decode=True)
        nh, nkv, hd, scale, softcap = spec.nh, spec.nkv, spec.hd, spec.scale, spec.softcap
        from mlx_bridge.deploy.native.layers import ACT
        act = ACT[spec.act]
        def layer(x, m, w, kc, vc, cos, sin, mask, slots):
            ln1, ln2, ln_pre, ln_post, wqkv, bqkv, wo, bo, qn, kn, wgu, bgu, wd, bd = w
            x = x + m
            B, L, _ = x.shape
            q, k, v = F.linear(fm.rms(x, ln1, eps, gemma), wqkv, bqkv).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.view(B, L, nh, hd).transpose(1, 2), k.view(B, L, nkv, hd).transpose(1, 2), v.view(B, L, nkv, hd).transpose(1, 2)
            q, k = fm.apply_rope(q, cos, sin), fm.apply_rope(k, cos, sin)
            kc.index_copy_(2, slots, k); vc.index_copy_(2, slots, v)
            o = fm._decode_attend(q, kc, vc, mask, scale, softcap)
            o = F.linear(o.transpose(1, 2).reshape(B, L, nh * hd), wo, bo)
            x = x + o
            gate, up = F.linear(fm.rms(x, ln2, eps, gemma), wgu, bgu).chunk(2, dim=-1)
            return x, F.linear(act(gate) * up, wd, bd)
        def head(x, m, norm, w):
            return F.linear(fm.rms((x + m)[:, -1], norm, eps, gemma), w)
        c = fast_mod._compile if self.use_compile else (lambda f: f)
        self._rlayer, self._rhead = c(layer), c(head)
    def _run_segment(self, st, i, mode):
        f = self.fused
        slot, pad = st.slot[i], st.pad[i]
        x = fm.embed(f, st.tok)
        m = torch.zeros_like(x)
        rot, ms = self._rope_masks(self._ropes[self.segments[0].device], slot, pad, st.S, f.windows, self.dtype, True)
        for li in self.segments[0].layers:
            L = f.layers[li]
            x, m = self._rlayer(x, m, L.w, st.k[li], st.v[li], *rot[L.rope], ms[L.window], slot)
        logits = self._rhead(x, m, f.norm, f.head)
        slot.add_(1)
        st.logits.copy_(logits)
        nxt = greedy(logits)
        st.nxt.copy_(nxt)
        st.hist.index_copy_(0, st.step, nxt[None])
        st.step.add_(1); st.counter.add_(1)
        st.tok.copy_(nxt[:, None])

VARIANTS = {
    "base": ({}, FastRunner),
    "coord": ({"_compile": cd_compile}, FastRunner),  # now the default (fast.INDUCTOR_OPTIONS)
    "math_attn": ({"attend": math_attend}, FastRunner),
    "eff_attn": ({"attend": eff_attend}, FastRunner),
    "len128": ({"len": len128}, FastRunner),
    "resid": ({}, ResidRunner),
    "resid+coord": ({"_compile": cd_compile}, ResidRunner),
    "all": ({"_compile": cd_compile, "len": len128, "attend": math_attend}, ResidRunner),
    "base2": ({}, FastRunner),
    # max_tokens 4096 (a chat default), the answer stops after 256 tokens: the cache starts small and
    # grows (default) vs allocated for the whole budget up front (before GROW_AHEAD)
    "budget4096": ({"_compile": cd_compile, "budget": 4096}, FastRunner),
    "budget4096-upfront": ({"_compile": cd_compile, "budget": 4096, "grow": 1 << 30}, FastRunner),
}
results, ref = {}, None
tokens, pad = prompts(1, P, cfg.vocab_size, dev)
for name, (patch, cls) in VARIANTS.items():
    if only and name not in only:
        continue
    fast_mod._compile = patch.get("_compile", orig_compile)
    fm._decode_attend = patch.get("attend", orig_attend)
    fast_mod.len_bucket = patch.get("len", orig_len)
    fast_mod.GROW_AHEAD = patch.get("grow", orig_grow)
    budget = patch.get("budget", N)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        r = cls(native) if cuda else cls(native, compile=False)
        def first_n():  # the first N tokens of a generation allowed `budget`
            it = r.steps(tokens, pad, budget)
            out = [next(it) for _ in range(N)]
            it.close()
            return out, it

        toks, _ = first_n()  # compile + capture
        tc = time.perf_counter() - t0
        rates = []
        for _ in range(3):
            sync(dev); t = time.perf_counter()
            it = r.steps(tokens, pad, budget); next(it); t1 = time.perf_counter()
            rest = [next(it) for _ in range(N - 1)]; sync(dev)
            it.close()
            rates.append((N - 1) / (time.perf_counter() - t1))
        toks = [t[0] for t in toks]
        ref = ref or toks
        same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref))
        results[name] = dict(rate=statistics.median(rates), spread=max(rates) - min(rates), compile_s=tc, same_as_base=same)
    except Exception as e:
        results[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    print(name, results[name], flush=True)
    del r
    if cuda: torch.cuda.empty_cache()
wb = (sum(p.numel() for p in native.parameters()) - cfg.vocab_size * cfg.hidden_size) * dtype.itemsize
print(f"\n# {torch.cuda.get_device_name(dev) if cuda else 'cpu'} torch {torch.__version__} copy bw {bw/1e12:.2f} TB/s roofline {bw/wb:.0f} tok/s")
for k, v in results.items():
    print(f"{k:14s} " + (f"{v['rate']:7.1f} tok/s (spread {v['spread']:.1f}) compile {v['compile_s']:.0f}s same {v['same_as_base']}" if "rate" in v else v["error"]))
if os.environ.get("OUT"):
    json.dump(results, open(os.path.join(os.environ["OUT"], "variants.json"), "w"), indent=1)
