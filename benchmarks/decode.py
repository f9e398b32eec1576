"""Decode speed of the deployed model: the fast path against transformers' `generate`, same weights.

Builds a random-weight Llama of the given shape on the device (default Llama-2-7B: hidden 4096, 32
layers, 32 heads, intermediate 11008, vocab 32000), shares its tensors with the package's native class,
and measures in one run, for transformers' default `generate` (the anchor), the eager static-cache
`NativeRunner`, `FastRunner` with graphs only, and `FastRunner` compiled + graphs:

- decode tokens/s at batch 1: 256 new tokens after a 128-token prompt (first token excluded);
- time to first token for a 512-token prompt (median of 5);
- throughput (new tokens/s, all rows) at batch 8 and 32, same prompt and length.

The roofline is bytes of weights read per decode step (all but the embedding table) over the
device-to-device copy bandwidth measured in the same run. MoE shapes (`qwen3-30b-a3b`) count only the
experts a step reads: top_k a layer at batch 1, the distinct experts the batch's rows route to at
batch B (`decode_moe.py`). Greedy tokens of the fast path are
compared with the eager path's (random weights make near-ties common in bf16: reported, not asserted).

    python benchmarks/decode.py                      # CUDA, Llama-2-7B shape, bf16
    python benchmarks/decode.py --shape tiny          # CPU development run (seconds)
    python benchmarks/decode.py --dtype float16 --json out.json
    python benchmarks/decode.py --shape qwen3-30b-a3b --new 128 --hf-new 16 --skip graph
    python benchmarks/decode.py --shape glm-4.7-flash --new 128 --hf-new 16 --skip graph,eager
    python benchmarks/decode.py --shape glm-4.5-air --layers 16 --new 128 --hf-new 16 --skip graph,eager  # 16 of 46
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    # Qwen3-30B-A3B: 48 layers, 128 experts of 768, top-8, GQA 32/4 heads of 128
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6),
    # gpt-oss-20b: 24 layers, 32 experts of 2880, top-4, 64/8 heads of 64, sinks, alternating 128-token window
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        max_position_embeddings=131072),
    # The three below: the published config.json values (GLM-4.7-Flash as in vLLM's glm4_moe_lite config test,
    # Moonlight's as embedded whole in public parsers' tests, GLM-4.5-Air as in THUDM slime's
    # glm4.5-106B-A12B.sh), rms_norm_eps 1e-5 for all three as `build` sets it.
    # GLM-4.7-Flash (glm4_moe_lite): 47 layers (the first dense), latent attention (20 heads, q rank 768, kv rank
    # 512, nope 192 + rope 64, v 256), 64 experts of 1536, top-4, one shared expert, sigmoid routing x 1.8
    "glm-4.7-flash": dict(model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
                          moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20,
                          num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192,
                          qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64, n_shared_experts=1,
                          num_experts_per_tok=4, norm_topk_prob=True, routed_scaling_factor=1.8, n_group=1,
                          topk_group=1, first_k_dense_replace=1, max_position_embeddings=202752, rope_theta=1e6),
    # Moonlight-16B-A3B (deepseek_v3): 27 layers (the first dense), latent attention (16 heads, no q rank, kv rank
    # 512, nope 128 + rope 64, v 128), 64 experts of 1408, top-6, two shared experts, sigmoid routing x 2.446
    "moonlight-16b-a3b": dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                              moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                              num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                              num_experts_per_tok=6, norm_topk_prob=True, routed_scaling_factor=2.446, n_group=1,
                              topk_group=1, first_k_dense_replace=1, max_position_embeddings=8192, rope_theta=50000.0),
    # GLM-4.5-Air (glm4_moe): 46 layers (the first dense; 106 B params, 212 GB in bf16: run it with --layers),
    # GQA 96/8 heads of 128 with q/k/v biases, half-rotary, 128 experts of 1408, top-8, one shared expert
    "glm-4.5-air": dict(model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
                        head_dim=128, attention_bias=True, partial_rotary_factor=0.5, n_routed_experts=128,
                        n_shared_experts=1, num_experts_per_tok=8, norm_topk_prob=True, routed_scaling_factor=1.0,
                        n_group=1, topk_group=1, first_k_dense_replace=1, use_qk_norm=False,
                        max_position_embeddings=131072, rope_theta=1e6),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                           max_position_embeddings=2048),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(shape: str, dtype, dev, layers: int | None = None):
    """(transformers model, native Transformer sharing its tensors, config); `layers` overrides the depth."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlx_bridge.deploy.native.config import ModelArgs
    from mlx_bridge.deploy.native.model import Transformer

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(kw.pop("model_type", "llama"), **kw, rms_norm_eps=1e-5, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf = hf.eval().requires_grad_(False)
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        native = Transformer(ModelArgs.from_hf(config))
    if native.args.moe:
        from decode_moe import share_experts

        share_experts(hf, native)  # transformers' stacked experts become the native class's
    else:
        native.load_state_dict(hf.state_dict(), strict=True, assign=True)
    native.reset_rope(dev)
    return hf, native.eval().requires_grad_(False), config


def bandwidth(dev) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 copies of 1 GiB."""
    if dev.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ts = []
    for _ in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / statistics.median(ts[3:])


def prompts(B: int, P: int, vocab: int, dev, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, P), generator=g).to(dev), torch.zeros(B, dtype=torch.long, device=dev)


def run_steps(steps, dev):
    """Consume a token-step iterator; (seconds to first token, seconds for the rest, tokens)."""
    t0 = time.perf_counter()
    it = iter(steps)
    toks = [next(it)]
    t1 = time.perf_counter()
    toks += list(it)
    sync(dev)
    return t1 - t0, time.perf_counter() - t1, toks


def bench_runner(runner, B, P, N, vocab, dev, steps_fn):
    tokens, pad = prompts(B, P, vocab, dev)
    run_steps(steps_fn(runner, tokens, pad, N if steps_fn is fast_steps else 4), dev)  # warm-up: this bucket
    _, rest, toks = run_steps(steps_fn(runner, tokens, pad, N), dev)
    return B * (N - 1) / rest, toks


def native_steps(runner, tokens, pad, N):
    from mlx_bridge.deploy.generation import token_steps

    return token_steps(runner, [list(map(int, r)) for r in tokens.tolist()], N, tokens.device,
                       temperature=0.0, top_p=1.0, top_k=0, seed=None)


def fast_steps(runner, tokens, pad, N):
    return runner.steps(tokens, pad, N)


def ttft(first_token, dev, n=5) -> float:
    first_token()
    first_token()
    ts = []
    for _ in range(n):
        sync(dev)
        t = time.perf_counter()
        first_token()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_hf(hf, B, P, N, vocab, dev):  # noqa: D103 (returns tok/s and row 0's tokens)
    tokens, _ = prompts(B, P, vocab, dev)
    mask = torch.ones_like(tokens)

    def gen(n):
        sync(dev)
        t = time.perf_counter()
        out = hf.generate(tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(dev)
        return time.perf_counter() - t, out

    gen(4)
    t1, _ = gen(1)
    tn, out = gen(N)
    return B * (N - 1) / (tn - t1), out[0, P:].tolist()


def profile(runner, a, vocab, dev) -> None:
    """GPU time per kernel over the decode steps that run while 16 batch-1 tokens are read (graph replays
    of the measured bucket; `steps` queues the next 8 before reading 8: 24 steps run)."""
    tokens, pad = prompts(1, a.prompt, vocab, dev)
    it = runner.steps(tokens, pad, a.new)  # the bucket measured above: nothing allocated or captured
    next(it)  # prefill outside the profile
    cuda = dev.type == "cuda"
    act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        for _ in range(16):
            next(it)
        sync(dev)
    it.close()
    with open(a.profile, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=70))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    ap.add_argument("--device", default=None, help="default: cuda when present (tiny: cpu)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--hf-new", type=int, default=None, help="new tokens for transformers (default: --new)")
    ap.add_argument("--skip", default="", help="comma list of columns to skip: hf,eager,graph,fast")
    ap.add_argument("--profile", default=None, help="write a kernel-time table of 16 fast batch-1 steps here")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--pdl", action="store_true", help="inductor's kernels with programmatic dependent launch "
                    "(Hopper: a kernel starts while the one before it finishes)")
    a = ap.parse_args(argv)

    from mlx_bridge.deploy.runners import shapes
    from mlx_bridge.deploy.runners.fast import FastRunner
    from mlx_bridge.deploy.runners.base import NativeRunner

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() and a.shape != "tiny" else "cpu"))
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    skip = set(filter(None, a.skip.split(",")))
    if a.pdl:
        import torch._inductor.config as ic

        assert hasattr(ic.triton, "enable_pdl"), f"torch {torch.__version__}: inductor has no enable_pdl"
        shapes.INDUCTOR_OPTIONS["triton.enable_pdl"] = True
    batches = [int(b) for b in a.batches.split(",")]
    t = time.perf_counter()
    hf, native, cfg = build(a.shape, dtype, dev, a.layers)
    bw = bandwidth(dev)
    n_params = sum(p.numel() for p in hf.parameters())
    weight_bytes = (n_params - cfg.vocab_size * cfg.hidden_size) * dtype.itemsize  # embedding: one row a token
    moe = native.args.moe is not None
    if moe:  # a step reads only the experts it routes to
        from decode_moe import step_bytes, touched_experts

        dense_bytes, top_k_bytes = step_bytes(native, native.args.top_k)
        expert_bytes = top_k_bytes / native.args.top_k  # one expert in every sparse layer
        weight_bytes = dense_bytes + top_k_bytes
    step_weights = {}  # batch -> bytes of weights one step reads
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# {a.shape}: {cfg.num_hidden_layers} layers, {n_params / 1e9:.2f} B params, {a.dtype or dtype}, {card}, "
          f"torch {torch.__version__}, transformers experts: {getattr(cfg, '_experts_implementation', None)}, "
          f"{'PDL, ' if a.pdl else ''}"
          f"built in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; {weight_bytes / 1e9:.2f} GB of weights per step; "
          f"roofline batch 1: {bw / weight_bytes:.0f} tok/s", flush=True)

    cols = {}  # name -> (kind, runner factory); each runner is dropped after its column (memory)
    if "hf" not in skip:
        cols["transformers"] = ("hf", lambda: None)
    if "eager" not in skip:
        cols["eager static"] = ("native", lambda: NativeRunner(native))
    if "graph" not in skip and dev.type == "cuda":
        cols["graph only"] = ("fast", lambda: FastRunner(native, compile=False))
    if "fast" not in skip:
        cols["fast"] = ("fast", lambda: FastRunner(native))
    res: dict = {c: {} for c in cols}
    eager_tokens = None
    for name, (kind, make) in cols.items():
        t = time.perf_counter()
        runner = make()
        for B in batches:
            if kind == "hf":
                rate, toks = bench_hf(hf, B, a.prompt, a.hf_new or a.new, cfg.vocab_size, dev)
            else:
                if kind == "fast":
                    runner.prepare(batch_sizes=(B,), max_lens=(a.prompt + a.new,))
                rate, steps = bench_runner(runner, B, a.prompt, a.new, cfg.vocab_size, dev,
                                           native_steps if kind == "native" else fast_steps)
                toks = [t[0] for t in steps]
                if moe and name == "fast":  # replay the batch's routing: experts touched per step
                    rows = torch.cat([prompts(B, a.prompt, cfg.vocab_size, dev)[0],
                                      torch.tensor(steps[:-1], device=dev).T], 1)
                    n = touched_experts(native, rows, a.prompt)
                    step_weights[B] = dense_bytes + n * expert_bytes
                    res[name][f"experts a layer, batch {B}"] = n
            res[name][f"tok/s batch {B}"] = rate
            if B == 1:
                res[name]["tokens"] = toks
                if kind == "native":
                    eager_tokens = toks
        tt, _ = prompts(1, a.ttft_prompt, cfg.vocab_size, dev, seed=2)
        if kind == "hf":
            first = lambda: hf.generate(tt, attention_mask=torch.ones_like(tt), max_new_tokens=1, do_sample=False)[0, -1].item()  # noqa: E731
        else:
            first = lambda: runner.start(tt, torch.zeros(1, dtype=torch.long, device=dev), a.ttft_prompt + 1).argmax(-1).item()  # noqa: E731
        res[name]["ttft ms"] = ttft(first, dev) * 1e3
        print(f"# {name}: measured in {time.perf_counter() - t:.0f} s: " + ", ".join(
            f"{k} {v:.1f}" for k, v in res[name].items() if k != "tokens"), flush=True)
        if a.profile and name == "fast":
            profile(runner, a, cfg.vocab_size, dev)
        if moe and kind == "fast" and dev.type == "cuda":
            from mlx_bridge.deploy.runners.moe_kernels import _TUNED

            print("# decode blocks timed: " + "; ".join(f"{key[0]} rows: [gate; up] BN {c['BN']} stages {c['num_stages']}, "
                  f"down BN {c['down']['BN']} stages {c['down']['num_stages']}" for key, c in _TUNED.items()), flush=True)
        del runner, first
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    rows = [(f"tok/s batch {B}", f"decode tok/s, batch {B}" if B == 1 else f"throughput tok/s, batch {B}") for B in batches]
    rows.insert(1 if batches[:1] == [1] else 0, ("ttft ms", f"TTFT ms, {a.ttft_prompt}-token prompt"))
    names = list(cols)
    w = max(len(r[1]) for r in rows) + 2
    print()
    print("".ljust(w) + "".join(n.rjust(14) for n in names) + "   fast/HF   roofline")
    for key, label in rows:
        line = label.ljust(w) + "".join(f"{res[n][key]:14.1f}" for n in names)
        if "fast" in res and "transformers" in res:
            r = res["fast"][key] / res["transformers"][key]
            line += f"{(1 / r if key == 'ttft ms' else r):9.1f}x"
        if key.startswith("tok/s") and bw == bw:
            B = int(key.split()[-1])
            roof = B * bw / step_weights.get(B, weight_bytes)
            line += f"   {roof:6.0f}" + (f" ({res['fast'][key] / roof:.0%})" if "fast" in res else "")
        print(line)
    if moe and "fast" in res:
        print("\nexperts a sparse layer reads per step (of %d): " % native.args.num_experts + ", ".join(
            f"batch {B}: {res['fast'][f'experts a layer, batch {B}']:.1f}" for B in batches))
        if a.hf_new:
            print(f"transformers: {a.hf_new} new tokens a run (the others: {a.new})")
    if eager_tokens is not None and "fast" in res:
        same = next((i for i, (x, y) in enumerate(zip(res["fast"]["tokens"], eager_tokens)) if x != y), len(eager_tokens))
        print(f"\ngreedy tokens, batch 1: fast equals eager for the first {same} of {len(eager_tokens)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "dtype": str(dtype), "card": card, "torch": torch.__version__,
                       "bandwidth": bw, "weight_bytes": weight_bytes, "step_weights": step_weights,
                       "layers": cfg.num_hidden_layers, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
