"""The decode step's q/k norm + rope + cache-write kernel (`deploy/runners/rope_kernels.py`) on CPU through
Triton's interpreter, against the fused path's own PyTorch function (`fused.make_qkv`, what the eager
module computes): q/k norms plain and gemma-style or none, full and partial rotary, one slot shared by
the rows and a slot per row, in float32 (the interpreter truncates float32 to bfloat16 instead of
rounding it: the bfloat16 case runs in tests/test_attn_gpu.py); and the compiled layer half writing the
caches through the op in place. Skipped without triton, and where CUDA is present (tests/test_attn_gpu.py
and the fast-path GPU tests run the kernel there)."""

import pytest
import torch

from triton_interpreter import use_interpreter_or_skip

use_interpreter_or_skip("tests/test_fast_gpu.py")

from mlx_bridge.deploy.runners import fused as fm  # noqa: E402
from mlx_bridge.deploy.runners import rope_kernels as rk  # noqa: E402
from test_attn_gpu import ROPE_CASES, rope_case, rope_inputs, rope_spec  # noqa: E402


@pytest.mark.parametrize("c", ROPE_CASES)
def test_rope_cache_equals_make_qkv(c):
    (q, kc, vc), (q_ref, kr, vr) = rope_case(*c, torch.float32, "cpu")
    assert q.shape == q_ref.shape and q.dtype == torch.float32
    assert (q - q_ref).abs().max() < 2e-6
    assert (kc - kr).abs().max() < 2e-6  # the written keys, and nothing else changed
    assert torch.equal(vc, vr)  # values are copied


def test_rope_cache_op_writes_in_place_when_compiled():
    """The compiled layer half writes the caches through the op in place: the output code copies no cache."""
    B, nh, nkv, hd = 1, 4, 2, 32
    x, w, kc, vc, cos, sin, slots = rope_inputs(B, nh, nkv, hd, hd, True, False, False, torch.float32, "cpu", S=64)
    sp = rope_spec(nh, nkv, hd, True, False)
    want_k, want_v = kc.clone(), vc.clone()
    want_q = fm.make_qkv(sp)(x, w, want_k, want_v, cos, sin, slots)[0]

    def half(x, w, kc, vc, cos, sin, slots):
        qkv = torch.nn.functional.linear(fm.rms(x, w[0], sp.eps), w[4])
        return torch.ops.mlx_bridge.qk_rope_cache(qkv.view(B, -1), w[8], w[9], cos, sin, kc, vc, slots, nh, nkv,
                                                  sp.eps, False)

    from torch._inductor.utils import run_and_get_code

    q, codes = run_and_get_code(torch.compile(half, fullgraph=True, dynamic=False), x, w, kc, vc, cos, sin, slots)
    assert (q - want_q).abs().max() < 2e-6 and (kc - want_k).abs().max() < 2e-6 and torch.equal(vc, want_v)
    code = "\n".join(codes)
    assert "qk_rope_cache" in code and "clone" not in code and ".copy_(" not in code, code
