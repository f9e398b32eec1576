"""CUDA: the native classes on the GPU equal the CPU run; half precision; the decode step in a CUDA graph.

Marked `gpu`: skipped where torch sees no CUDA device (conftest).
"""

from __future__ import annotations

import pytest
import torch

from mlx_bridge.deploy.native.layers import KVCache
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.native.model import decode_step, prefill
from mlx_bridge.testing.adapters import shared_zoo

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 31, 33, 32, 60, 61], [52], [30, 31, 8, 9, 10, 11, 12, 13, 14]]  # token ids, ragged
ARCHS = ["llama", "qwen2", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe",
         "glm4_moe", "deepseek_v3", "glm4_moe_lite"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def ids_for(vocab, B=2, L=40):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_float32_equals_cpu(zoo, arch):
    cpu, gpu = load(zoo.hf(arch)), load(zoo.hf(arch), device="cuda")
    assert gpu.device.type == "cuda" and gpu.module.model.embed_tokens.weight.is_cuda
    assert type(gpu.runner).__name__ == "FastRunner"  # the default on CUDA
    ids = ids_for(cpu.config["vocab_size"])
    diff = (gpu.logits(ids).cpu() - cpu.logits(ids)).abs().max().item()
    assert diff < 1e-4, f"{arch}: {diff:.3g}"
    a = cpu.complete(PROMPTS, max_tokens=40, ignore_eos=True)
    b = gpu.complete(PROMPTS, max_tokens=40, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_cuda_half_precision_close_to_float32(zoo, arch, dtype):
    ref, m = load(zoo.hf(arch)), load(zoo.hf(arch), device="cuda", dtype=dtype)
    assert m.module.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    ids = ids_for(ref.config["vocab_size"], L=24)
    r = ref.logits(ids)
    diff = (m.logits(ids).cpu() - r).abs()
    if arch == "mixtral":  # rounding may flip a near-tie in the router: a few positions move a lot
        assert diff.mean().item() < 0.01 * r.abs().max().item()
    else:
        assert diff.max().item() < 0.05 * r.abs().max().item()
    out = m.complete(PROMPTS, max_tokens=16, ignore_eos=True)
    assert all(len(c.token_ids) == 16 for c in out)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "glm4_moe",
                                  "deepseek_v3", "glm4_moe_lite"])
def test_decode_step_replays_as_a_cuda_graph(zoo, arch):
    """The decode step has static shapes and no host sync: captured once, replayed per token, it gives
    the eager step's logits (MoE: the routed-experts kernels, static shapes)."""
    m = load(zoo.hf(arch), device="cuda")
    module, dev = m.module, m.device
    B, P, S = 2, 6, 32
    tokens = ids_for(m.config["vocab_size"], B, S).to(dev)
    pad = torch.tensor([0, 2], device=dev)
    caches = [KVCache.allocate(module.args, B, S, dev, torch.float32) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            prefill(module, c, tokens[:, :P], pad)
        tok = tokens[:, P:P + 1].clone()
        slot = torch.tensor([P], device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (writes slot P, rewritten below)
            decode_step(module, caches[0], tok, slot, pad)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_step(module, caches[0], tok, slot, pad)
        for s in range(P, S):
            tok.copy_(tokens[:, s:s + 1])
            slot.fill_(s)
            graph.replay()
            eager = decode_step(module, caches[1], tokens[:, s:s + 1], torch.tensor([s], device=dev), pad)
            diff = (out - eager).abs().max().item()
            assert diff < 1e-4, f"{arch} slot {s}: {diff:.3g}"


def test_transformers_backend_on_cuda(zoo):
    native = load(zoo.hf("llama"), device="cuda")
    hf = load(zoo.hf("llama"), device="cuda", backend="transformers")
    assert [c.token_ids for c in native.complete(PROMPTS, max_tokens=20, ignore_eos=True)] == \
           [c.token_ids for c in hf.complete(PROMPTS, max_tokens=20, ignore_eos=True)]
