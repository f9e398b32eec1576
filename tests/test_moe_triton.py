"""The CUDA MoE kernels (`deploy/runners/moe_kernels.py`) on CPU through Triton's interpreter, against
the PyTorch reference: the routing kernel against `route` (ids equal, weights to rounding) for every
native MoE type, and the routed-experts kernels, a block per routed row (decode) and grouped by
expert, against `experts_ref`, in float32 (the interpreter's bfloat16 `tl.dot` is wrong; bfloat16 runs in
tests/test_moe_gpu.py). Skipped without triton, and where CUDA is present (the GPU tests run them)."""

import pytest
import torch

from mlx_bridge.deploy.native.moe import route

from triton_interpreter import use_interpreter_or_skip

use_interpreter_or_skip("tests/test_moe_gpu.py")

from mlx_bridge.deploy.runners import moe_kernels as mk  # noqa: E402
from test_moe import routed_case, routed_error  # noqa: E402

KINDS = [("mixtral", True), ("qwen3_moe", True), ("qwen2_moe", False), ("olmoe", False), ("gpt_oss", True)]


def distinct_logits(T: int, E: int, dtype, seed: int = 0) -> torch.Tensor:
    """(T, E) logits, all distinct in every row and exact in bfloat16 (multiples of 1/16 within +-8)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([(torch.randperm(E, generator=g) - E // 2).float() / 16 * (1 + (t % 3)) for t in range(T)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,norm", KINDS)
def test_route_kernel_equals_route(kind, norm, dtype):
    logits = distinct_logits(6, 60, dtype)  # 60 experts: a masked tail in the 64-wide block
    w, idx = mk.route_fused(logits, kind, 4, norm)
    ref_w, ref_idx = route(logits, kind, 4, norm)
    assert torch.equal(idx, ref_idx) and w.dtype == ref_w.dtype
    ulp = 4 * torch.finfo(w.dtype).eps * ref_w.abs().float()  # exp and the sums round differently
    assert ((w.float() - ref_w.float()).abs() <= ulp).all()


def test_route_kernel_top8_of_128_with_ties():
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-6, 6, (5, 128), generator=g).float() / 4  # many equal logits: ties at the cut
    w, idx = mk.route_fused(logits, "qwen3_moe", 8, True)
    ref_w, ref_idx = route(logits, "qwen3_moe", 8, True)  # torch.topk on CPU orders ties its own way
    want = [sorted(range(128), key=lambda e: (-row[e], e))[:8] for row in logits.tolist()]
    assert idx.tolist() == want and torch.allclose(w, ref_w, rtol=4e-7, atol=0)


def test_route_kernel_ties_lower_id_first():
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0, 1.0]])
    w, idx = mk.route_fused(logits, "qwen3_moe", 4, True)
    assert idx.tolist() == [[1, 3, 2, 4]]
    assert torch.allclose(w, route(logits, "qwen3_moe", 4, True)[0].sort(descending=True).values)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("layout", ["rows", "gpt_oss", "gpt_oss_stacked"])
def test_routed_kernels_equal_reference(layout, T, gather):
    case = routed_case(layout, T, (16, 4, 64, 40), torch.float32, seed=T)  # I = 40: masked tails
    x, w, idx, ex, glu = case
    # small blocks: several tiles and K steps; `down` with its own width, as the decode configurations
    cfg = dict(BM=16, BN=16, BK=32, num_warps=4, num_stages=1, down=dict(BN=32))
    y = mk.routed(x, w, idx, *ex, glu is not None, *(glu or (0.0, 0.0)), cfg=cfg, gather=gather)
    assert y.shape == (idx.numel(), x.shape[1])
    assert routed_error(y, case) < 1e-6


def test_gathers_at_decode_only():
    assert mk.gathers(1, 8, 128) and mk.gathers(8, 8, 128) and not mk.gathers(32, 8, 128)
    assert mk.gathers(1, 4, 32) and not mk.gathers(8, 4, 32)  # gpt-oss-20b: batch 8 groups
