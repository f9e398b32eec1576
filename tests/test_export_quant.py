"""Issue 2, quantized bases: every dequantized weight equals `mx.dequantize` bit for bit (in the scales'
dtype), the output config has no quantization block, and QLoRA exports compute what MLX computed."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_bridge.errors import BridgeError
from test_export_common import (adapter_targets, assert_close, check_copied, exported, hf_config, ids_for, load_hf,
                                mlx_source_of, read_tensors, run_export, torch_logits, zoo)  # noqa: F401

# hidden 128 / intermediate 256: every linear's input divides group size 128 as well as 32 and 64
WIDE = dict(hidden_size=128, intermediate_size=256)
AFFINE = [(2, 64), (3, 64), (4, 64), (5, 64), (6, 64), (8, 64), (4, 32), (4, 128)]


def _quant_params(cfg: dict, module: str) -> dict:
    q = cfg["quantization"]
    own = q.get(module) if isinstance(q.get(module), dict) else {}
    return {"group_size": own.get("group_size", q["group_size"]), "bits": own.get("bits", q["bits"]),
            "mode": own.get("mode", q.get("mode", "affine"))}


def _raw(a) -> tuple[str, bytes]:
    """(safetensors dtype, bytes) of an mx.array, bf16 included."""
    import mlx.core as mx

    names = {mx.float32: ("F32", mx.uint32), mx.float16: ("F16", mx.uint16), mx.bfloat16: ("BF16", mx.uint16)}
    st, view = names[a.dtype]
    return st, np.array(a.view(view)).tobytes()


def check_dequantized(out, base) -> int:
    """Each exported weight of a quantized MLX module equals mx.dequantize(...) bit for bit; the rest is
    copied. Returns how many weights were dequantized."""
    import mlx.core as mx

    cfg = hf_config(base)
    src = {}
    for f in sorted(base.glob("model*.safetensors")):
        src.update(mx.load(str(f)))
    dst = read_tensors(out)
    leftovers = [k for k in dst if k.endswith((".scales", ".biases"))]
    assert not leftovers, f"quantization tensors in the export: {leftovers[:5]}"
    n, problems = 0, []
    for name, (dt, shape, raw) in dst.items():
        sname, e = mlx_source_of(name)
        mod = sname.rsplit(".", 1)[0]
        if not (sname.endswith(".weight") and f"{mod}.scales" in src):
            continue
        p = _quant_params(cfg, mod)
        ref = mx.dequantize(src[sname], src[f"{mod}.scales"], src.get(f"{mod}.biases"), **p)
        ref = ref[e] if e is not None else ref
        if p["mode"] != "affine":  # scales are uint8 exponents: compare the values in the exported dtype
            ref = ref.astype({"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[dt])
        want_dt, want = _raw(ref)  # affine: mx.dequantize computes in the scales' dtype
        if (dt, shape) != (want_dt, tuple(ref.shape)):
            problems.append(f"{name}: {dt}{shape}, mx.dequantize gives {want_dt}{tuple(ref.shape)}")
        elif raw != want:
            a = np.frombuffer(raw, np.uint8)
            problems.append(f"{name} ({p}): {int((a != np.frombuffer(want, np.uint8)).sum())} bytes differ")
        n += 1
    assert not problems, f"{len(problems)} weights not exact: " + "; ".join(problems[:8])
    quantized = {k.rsplit(".", 1)[0] + ".weight" for k in src if k.endswith(".scales")}
    check_copied(out, base, touched=quantized)
    return n


@pytest.mark.parametrize("bits,group_size", AFFINE, ids=[f"{b}bit-g{g}" for b, g in AFFINE])
def test_affine_dequantization_is_exact(zoo, bits, group_size):
    base = zoo.mlx("llama", quant=dict(bits=bits, group_size=group_size), **WIDE)
    out = exported(base)
    cfg = hf_config(out)
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert check_dequantized(out, base) == 2 * 7 + 2  # 7 linears a block, embed_tokens, lm_head
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what=f"llama {bits}-bit g{group_size}")


def test_bf16_scales_dequantize_in_bf16(zoo):
    """A bf16 4-bit base: w = s*q + b computed in bf16 with a rounding after each op (as MLX does)."""
    base = zoo.mlx("llama", dtype="bfloat16", quant=dict(bits=4, group_size=64))
    out = exported(base)
    assert check_dequantized(out, base) > 0
    assert hf_config(out).get("dtype", hf_config(out).get("torch_dtype")) == "bfloat16"


def _mixed_predicate(path, module):
    """Per-layer overrides: 8-bit g32 down_proj, float k_proj, 4-bit g64 (the default) elsewhere."""
    if "k_proj" in path:
        return False
    if "down_proj" in path:
        return {"bits": 8, "group_size": 32, "mode": "affine"}
    return hasattr(module, "to_quantized")


def test_per_layer_overrides(zoo):
    base = zoo.mlx("llama", quant=dict(bits=4, group_size=64), name="mixed", quant_predicate=_mixed_predicate, **WIDE)
    q = hf_config(base)["quantization"]
    assert q["model.layers.0.mlp.down_proj"]["bits"] == 8, q  # the override is really there
    assert "model.layers.0.self_attn.k_proj.scales" not in read_tensors(base)
    out = exported(base)
    assert check_dequantized(out, base) == 2 * 6 + 2
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what="llama mixed bits")


def test_moe_quantized_experts_are_exact(zoo):
    """qwen3_moe 4-bit g32 (experts' inputs are 32 wide): stacked quantized experts dequantized per expert."""
    base = zoo.mlx("qwen3_moe", quant=dict(bits=4, group_size=32))
    out = exported(base)
    assert check_dequantized(out, base) >= 2 * 3 * 4  # 2 layers x 3 projections x 4 experts at least
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what="qwen3_moe 4-bit")


@pytest.mark.parametrize("arch,quant", [("llama", dict(bits=4, group_size=64)), ("qwen3_moe", dict(bits=4, group_size=32)),
                                        ("llama", dict(bits=4, group_size=32, mode="mxfp4"))],
                         ids=["llama-4bit", "qwen3_moe-4bit", "llama-mxfp4"])
def test_qlora_export_matches_mlx(zoo, arch, quant):
    """LoRA trained on a quantized base (QLoRA), MoE switch_mlp LoRA included: fused on the dequantized base."""
    base = zoo.mlx(arch, quant=quant)
    ad = zoo.adapter(base, "qlora", rank=4)
    if arch == "qwen3_moe":
        assert any("switch_mlp" in t for t in adapter_targets(ad))
    out = exported(ad)
    cfg = hf_config(out)
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what=f"{arch} qlora")


def test_qdora_export_matches_mlx(zoo):
    base = zoo.mlx("llama", quant=dict(bits=4, group_size=64))
    ad = zoo.adapter(base, "qdora", fine_tune_type="dora", rank=4, keys=["self_attn.q_proj", "mlp.down_proj"])
    out = exported(ad)
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="llama 4-bit dora")


FP_MODES = [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)]


@pytest.mark.parametrize("mode,bits,group_size", FP_MODES, ids=[m for m, _, _ in FP_MODES])
def test_float_quant_modes_are_exact(zoo, mode, bits, group_size):
    """Modes without biases (uint8 E8M0 / E4M3 scales) are exported, exactly as mx.dequantize computes them."""
    base = zoo.mlx("llama", quant=dict(bits=bits, group_size=group_size, mode=mode))
    out = exported(base)
    assert check_dequantized(out, base) == 2 * 7 + 2
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what=f"llama {mode}")


def test_nvfp4_global_scale_is_refused_by_name(zoo, tmp_path):
    """nvfp4 experts with a per-expert global scale (mlx-lm `quantize_model(global_scale=True)`): refused,
    naming the tensor and the mode, nothing written."""
    from mlx_lm.utils import load, quantize_model, save

    src = zoo.mlx("qwen3_moe")
    model, tok, config = load(str(src), return_config=True)
    model, config = quantize_model(model, config, 16, 4, mode="nvfp4", global_scale=True)
    base = tmp_path / "nvfp4-gs"
    save(base, src, model, tok, config)
    gs = [k for k in read_tensors(base) if k.endswith(".global_scale")]
    assert gs, "mlx-lm wrote no global_scale: the fixture does not test what it says"
    out = tmp_path / "out"
    with pytest.raises(BridgeError) as e:
        run_export(base, out)
    assert "global_scale" in str(e.value) and "nvfp4" in str(e.value), str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nvfp4-gs"]
