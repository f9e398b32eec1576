"""Issue 10: every registered type the older parity files do not cover — a tiny random transformers model ->
mlx-lm convert -> (LoRA on every linear) -> export with the registry's derived rules -> transformers' logits
within 1e-3 relative of MLX's. The list comes from the registry, not from this file.

Types whose tensors mlx-lm drops (vision towers of multimodal checkpoints, an unused routing bias) are
exported with `hf_base=` the HF checkpoint, and the dropped tensors are checked to be its bytes (or zeros)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_bridge.archs import get_arch, supported, template
from mlx_bridge.testing.adapters import probe_ids
from test_export_archs import MORE
from test_export_common import ARCHS, as_array, assert_close, exported, hf_config, read_tensors, zoo  # noqa: F401

NEW = [t for t in supported() if t not in ARCHS + MORE]
RTOL = 1e-3


def close(got, want, what):
    assert_close(got, want, atol=RTOL * float(np.abs(want).max()), what=what)


def load(d, arch):
    """The type's own auto class, failing on any missing/unexpected/mismatched key."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if arch.hf_auto == "causal_lm" else AutoModelForImageTextToText
    model, info = auto.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: loading info not clean: {bad}"
    return model.eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    x = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():  # no cache: hybrid linear-attention caches cannot be built for a bare forward
        try:
            return model(x, use_cache=False).logits.float().numpy()
        except AttributeError:  # llama4's multimodal forward fails on text alone (transformers 5.24): its LM
            return model.language_model(x, use_cache=False).logits.float().numpy()


@pytest.mark.parametrize("model_type", NEW)
def test_registry_type_plain_and_lora(zoo, model_type):
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type)
    kw = {"hf_base": str(zoo.hf(model_type))} if arch.dropped else {}
    cfg = hf_config(base)
    ids = probe_ids((cfg.get("text_config") or cfg)["vocab_size"], n=1, length=24, seed=3)
    out = exported(base, **kw)
    close(torch_logits(load(out, arch), ids), zoo.logits(base, ids=ids), f"{model_type} plain")
    if arch.dropped:  # copied from the HF base byte for byte, or the zeros MLX computed with
        src, dst = read_tensors(zoo.hf(model_type)), read_tensors(out)
        for k, t in src.items():
            if template(k)[0] in arch.dropped:
                want = np.zeros_like(as_array(t)).tobytes() if template(k)[0] in arch.quirks.unused else t[2]
                assert dst[k][2] == want, f"{k}: not as in the HF base"
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad, **kw), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} lora")


# Gemma 4's tiny config has every feature at once (so the derivation sees every tensor); the released sizes each
# have a subset: E2B/E4B per-layer inputs + kv-shared layers + double-wide MLP, 31B dense with k = v on global
# layers, 26B-A4B MoE beside the MLP with k = v
GEMMA4_SIZES = {
    "e2b": dict(enable_moe_block=False, attention_k_eq_v=False, num_global_key_value_heads=None),
    "31b": dict(num_kv_shared_layers=0, use_double_wide_mlp=False, hidden_size_per_layer_input=0,
                enable_moe_block=False),
    "26b_a4b": dict(num_kv_shared_layers=0, use_double_wide_mlp=False, hidden_size_per_layer_input=0),
}


@pytest.mark.parametrize("size", [s if s == "e2b" else pytest.param(s, marks=pytest.mark.slow) for s in GEMMA4_SIZES])
def test_gemma4_released_shapes(zoo, size):
    arch = get_arch({"model_type": "gemma4_text"})
    base = zoo.mlx("gemma4_text", **GEMMA4_SIZES[size])
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    close(torch_logits(load(exported(base), arch), ids), zoo.logits(base, ids=ids), f"gemma4 {size} plain")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"gemma4 {size} lora")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "granitemoe", "qwen3_next"])
def test_4bit_base_lora(zoo, model_type):
    """A 4-bit base (g32) under LoRA, for types whose rules transpose, concatenate or shift: each part is
    dequantized and adapted before mlx-lm's sanitize is undone."""
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type, quant=dict(bits=4, group_size=32))
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} 4-bit lora")


@pytest.mark.parametrize("model_type", ["smollm3", "glm4", "phi"])
def test_dora(zoo, model_type):
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type)
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "dora", fine_tune_type="dora", rank=4)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} dora")


def test_bf16_shifted_norms_rounded_once(zoo):
    """qwen3_next in bf16: mlx-lm stores its norms +1; the export writes bf16(float32(w) - 1), rounded once,
    and every tensor no rule touches is the MLX bytes."""
    base = zoo.mlx("qwen3_next", dtype="bfloat16")
    src, dst = read_tensors(base), read_tensors(exported(base))
    arch = get_arch({"model_type": "qwen3_next"})
    shifted = 0
    for name, t in dst.items():
        rule = arch.rules[template(name)[0]]
        part = rule["parts"][0]
        if arch.plain(template(name)[0]) and "index" not in part:
            assert t == src[name], f"{name}: not the MLX bytes"
        elif set(part) == {"mlx", "shift"}:
            import torch

            w = torch.frombuffer(bytearray(src[name][2]), dtype=torch.bfloat16).float()
            want = (w - part["shift"]).to(torch.bfloat16).view(torch.uint16).numpy().tobytes()
            assert t[0] == "BF16" and t[2] == want, f"{name}: not rounded once from float32"
            shifted += 1
    assert shifted >= 5


def peft_keys(arch, base) -> list[str]:
    """mlx-lm LoRA keys (module paths inside a layer) of the linears whose adapter PEFT can state and load: read only
    by plain rules (renamed, or one expert of a stack; not a whole stacked tensor) of HF modules PEFT wraps and its
    loading applies (alone or beside the siblings these keys include)."""
    ndim = {template(k)[0]: len(t[1]) for k, t in read_tensors(base).items()}
    ok, bad = set(), set()
    for t, rule in arch.rules.items():
        hf_mod = t.rsplit(".", 1)[0]
        why = arch.peft_misloads.get(hf_mod, "")
        for p in rule["parts"]:
            m = p["mlx"].rsplit(".", 1)[0]
            if m not in arch.linears:
                continue
            stacked = ndim.get(p["mlx"], 2) == 3 and "index" not in p
            fine = arch.plain(t) and not stacked and hf_mod not in arch.peft_refuses and not why.startswith("PEFT")
            (ok if fine else bad).add(m)
    return sorted({m.split("{}.", 1)[1] for m in ok - bad if "{}." in m})


PEFT_QUICK = ["smollm3", "glm4", "cohere2", "lfm2", "apertus", "minimax_m2", "deepseek_v3", "gemma3"]


@pytest.mark.parametrize("model_type", [t if t in PEFT_QUICK else pytest.param(t, marks=pytest.mark.slow)
                                        for t in supported()])
def test_peft(zoo, model_type, tmp_path):
    """PEFT's own loading of the --format peft export (`PeftModel.from_pretrained` on the type's HF export) computes
    what MLX computed with the adapter, for every exportable type: a LoRA on every linear where the docs say "yes",
    else on the linears PEFT can state and load (per-expert adapters of MoE types are converted by PEFT to
    transformers' fused experts where PEFT knows the type); a type with none refuses --format peft in one line."""
    from mlx_bridge import export
    from mlx_bridge.archs.docs import peft_column
    from mlx_bridge.errors import BridgeError
    from test_export_peft import peft_model

    arch = get_arch({"model_type": model_type})
    kw = {"hf_base": str(zoo.hf(model_type))} if arch.dropped else {}
    base = zoo.mlx(model_type)
    cfg = hf_config(base)
    ids = probe_ids((cfg.get("text_config") or cfg)["vocab_size"], n=1, length=24, seed=3)
    if peft_column(model_type) == "yes":
        ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    elif keys := peft_keys(arch, base):
        ad = zoo.adapter(base, "lora-peft", rank=4, num_layers=2, keys=keys)
    else:  # no projection PEFT can state (gpt2's Conv1D layout) or load: refused in one line, nothing written
        with pytest.raises(BridgeError, match="--format hf"):
            export(str(zoo.adapter(base, "lora", rank=4, num_layers=2)), str(tmp_path / "o"), format="peft",
                   progress=False, **kw)
        assert not (tmp_path / "o").exists()
        return
    moe = any("{e}" in t for t in arch.rules)
    model = peft_model(exported(base, **kw), exported(ad, format="peft", **kw), same_keys=not moe,
                       loader=lambda d: load(d, arch))
    close(torch_logits(model, ids), zoo.logits(base, ad, ids=ids), f"{model_type} peft")


def test_peft_refused_where_mlx_reshapes(zoo, tmp_path):
    """granitemoe's input_linear is mlx-lm's gate and up experts concatenated: an adapter on them has no PEFT
    form, said in one line, and nothing is written."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError

    base = zoo.mlx("granitemoe")
    ad = zoo.adapter(base, "lora-experts", rank=4, num_layers=1, keys=["block_sparse_moe.switch_mlp.gate_proj"])
    with pytest.raises(BridgeError, match="PEFT cannot express .*input_linear.*use --format hf"):
        export(str(ad), str(tmp_path / "o"), format="peft", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type,keys,why", [
    ("phimoe", ["block_sparse_moe.switch_mlp.gate_proj"], r"experts\.0\.w1 \(PEFT's loading does not apply it\)"),
    ("deepseek_v3", ["mlp.switch_mlp.gate_proj"], r"experts\.0\.gate_proj \(with siblings .*down_proj"),
    ("deepseek_v3", ["mlp.shared_experts.up_proj"], r"shared_experts\.up_proj \(PEFT's loading does not apply it\)")])
def test_peft_refuses_what_peft_misloads(zoo, tmp_path, model_type, keys, why):
    """Adapters PEFT's own loading would drop or misapply (derived by asking PEFT on the tiny checkpoint: phimoe's
    fused experts it does not convert, DeepSeek-V3's shared experts it renames with the routed ones, routed gate/up
    it converts only beside their siblings) are refused in one line, nothing written."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError

    ad = zoo.adapter(zoo.mlx(model_type), "lora-" + keys[0], rank=4, num_layers=1, keys=keys)
    with pytest.raises(BridgeError, match=rf"PEFT's loading does not apply these adapters as written .*{why}.*--format hf"):
        export(str(ad), str(tmp_path / "o"), format="peft", progress=False)
    assert not (tmp_path / "o").exists()


LOAD_QUICK = ["qwen3_next", "deepseek_v3", "phimoe", "gemma3", "mistral3", "gpt_oss"]


@pytest.mark.parametrize("model_type", [t if t in LOAD_QUICK else pytest.param(t, marks=pytest.mark.slow)
                                        for t in supported()])
def test_load_and_verify(zoo, model_type, tmp_path):
    """Deploy follows: a LoRA checkpoint of the type exports, loads with `mlx_bridge.load` (transformers'
    class the registry names, multimodal ones included) and `verify` passes on its MLX probes."""
    from mlx_bridge import export
    from mlx_bridge.testing.adapters import make_checkpoint
    from mlx_bridge.verify import verify

    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type)
    ckpt = make_checkpoint(zoo.adapter(base, "lora", rank=4, num_layers=2), tmp_path / "ckpt", base)
    out = export(ckpt, tmp_path / "deploy", log=lambda *a: None, progress=False, verify=False,
                 hf_base=str(zoo.hf(model_type)) if arch.dropped else None)
    report = verify(out)
    assert report["passed"], report["summary"]


def test_dropped_tensors_need_the_hf_base(zoo, tmp_path):
    """mlx_lm.convert drops gemma3's vision tower: without --hf-base the export says so in one line and writes
    nothing; with it, the model card notes nothing is guessed (ernie's unused bias is noted as zeros)."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError

    with pytest.raises(BridgeError, match="mlx-lm drops .* of gemma3 .*pass --hf-base DIR"):
        export(str(zoo.mlx("gemma3")), str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()
    out = exported(zoo.mlx("ernie4_5_moe"), hf_base=str(zoo.hf("ernie4_5_moe")))
    assert "e_score_correction_bias: mlx-lm loads it but computes without it" in (out / "README.md").read_text()


def test_mxfp4_hub_layout_is_what_transformers_and_mlx_lm_read(zoo):
    """gpt_oss's tiny hub checkpoint (`archs.hub.to_mxfp4_hub`): transformers dequantizes its experts to the
    values `mxfp4_unpack` gives, mlx-lm's `mx.dequantize` of the sanitized experts gives them too, and the
    export of mlx-lm's conversion writes exactly them (gate/up interleaved back, transposed)."""
    import mlx.core as mx
    import torch
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    from mlx_bridge.archs.hub import mxfp4_pack, mxfp4_unpack

    d = zoo.hub("gpt_oss")
    ts = read_tensors(d)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).state_dict()
    mlx_model, _ = load_model(d)
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts."
        for p in ("gate_up_proj", "down_proj"):
            want = mxfp4_unpack(as_array(ts[pre + p + "_blocks"]), as_array(ts[pre + p + "_scales"]))
            assert np.array_equal(hf[pre + p].numpy(), want), f"{pre}{p}: transformers reads other values"
            assert np.array_equal(mxfp4_unpack(*mxfp4_pack(want)), want)  # values on the grid are kept exactly
        ex = mlx_model.layers[layer].mlp.experts
        mods = {"gate": ex.gate_proj, "up": ex.up_proj, "down": ex.down_proj}
        deq = {n: np.array(mx.dequantize(m.weight, m.scales, None, m.group_size, m.bits, mode=m.mode).astype(mx.float32))
               for n, m in mods.items()}
        gate_up = hf[pre + "gate_up_proj"].numpy()  # (E, D, 2I), gate and up interleaved
        assert np.array_equal(deq["gate"], gate_up[..., ::2].swapaxes(1, 2))
        assert np.array_equal(deq["up"], gate_up[..., 1::2].swapaxes(1, 2))
        assert np.array_equal(deq["down"], hf[pre + "down_proj"].numpy().swapaxes(1, 2))
    for dtype in ("float32", "bfloat16"):  # the export of mlx-lm's conversion: the same values, exactly (bf16 holds them)
        out = read_tensors(exported(zoo.mlx("gpt_oss", dtype=dtype)))
        for k in [k for k in out if ".experts." in k and not k.endswith("_bias")]:
            assert out[k][0] == {"float32": "F32", "bfloat16": "BF16"}[dtype], k
            got = as_array(out[k]).astype(np.float32)
            assert np.array_equal(got, hf[k].numpy()), f"{k} ({dtype}): not the dequantized hub values"


def test_gpt_oss_peft_attention_and_refusals(zoo, tmp_path):
    """gpt_oss: a PEFT adapter on attention computes what MLX computed; adapters on the MXFP4 experts (mlx-lm
    splits the interleaved gate/up) or on the router (transformers' GptOssTopKRouter, not a Linear PEFT can
    wrap) are refused in one line, nothing written."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError
    from test_export_peft import peft_model

    base = zoo.mlx("gpt_oss")
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "lora-attn", rank=4, num_layers=2, keys=["self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "self_attn.o_proj"])
    model = peft_model(exported(base), exported(ad, format="peft"))
    close(torch_logits(model, ids), zoo.logits(base, ad, ids=ids), "gpt_oss peft")
    for name, keys, why in (("lora-experts", ["mlp.experts.gate_proj"], "reshapes, splits or shifts"),
                            ("lora-router", ["mlp.router"], r"refuses to target .*mlp\.router \(GptOssTopKRouter\)")):
        ad = zoo.adapter(base, name, rank=4, num_layers=1, keys=keys)
        with pytest.raises(BridgeError, match=f"{why}.*use --format hf"):
            export(str(ad), str(tmp_path / name), format="peft", progress=False)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("model_type,key,module", [("mamba", "mixer.out_proj", "MambaMixer|Linear"),
                                                   ("qwen2_moe", "mlp.gate", "Qwen2MoeTopKRouter")])
def test_peft_refuses_what_peft_refuses(zoo, tmp_path, model_type, key, module):
    """The modules PEFT itself refuses to target (derived by asking `get_peft_model`: Mamba's out_proj, qwen2_moe's
    router) are refused at export in one line, instead of an adapter PEFT cannot load."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError

    ad = zoo.adapter(zoo.mlx(model_type), f"lora-{key}", rank=4, num_layers=1, keys=[key])
    with pytest.raises(BridgeError, match=rf"refuses to target .*{key.split('.')[-1]} \(({module})\).*--format hf"):
        export(str(ad), str(tmp_path / "o"), format="peft", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["phi3", "phimoe"])
@pytest.mark.parametrize("length", [8, 24])
def test_longrope_as_mlx_computes(zoo, model_type, length):
    """mlx-lm's SuScaledRoPE rotates with the long factors at every length and scales by `long_mscale` (or
    the default from max / original positions); transformers picks the short factors (and phimoe its
    `short_mscale`) up to `original_max_position_embeddings`. The export states what MLX computed, so
    transformers matches MLX below and above the threshold (16 positions here)."""
    half = 8  # head_dim 16 of the tiny configs
    rng = np.random.default_rng(5)
    rope = {"rope_type": "longrope", "short_factor": [float(x) for x in 1 + rng.random(half)],
            "long_factor": [float(x) for x in 2 + 3 * rng.random(half)]}
    if model_type == "phimoe":
        rope.update(short_mscale=1.1, long_mscale=1.3)
    kw = dict(rope_scaling=rope, original_max_position_embeddings=16, max_position_embeddings=64)
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type, **kw)
    cfg = hf_config(base)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 2 * half
    ids = probe_ids(cfg["vocab_size"], n=1, length=length, seed=4)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} longrope")


@pytest.mark.parametrize("model_type, optional", [("glm4_moe", dict(use_qk_norm=False))])
def test_optional_tensors_absent(zoo, model_type, optional):
    """The tiny config traced for the rules turns optional tensors on (glm4_moe's q/k norms, as GLM-4.5 has
    them); a checkpoint without them (GLM-4.5-Air) exports the same way."""
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type, **optional)
    assert not any("q_norm" in k for k in read_tensors(base)), "the override did not drop the optional tensors"
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} {optional}")


_MUP = dict(attention_in_multiplier=0.9, attention_out_multiplier=0.5, key_multiplier=0.4, embedding_multiplier=2.0,
            lm_head_multiplier=0.25, ssm_in_multiplier=1.25, ssm_out_multiplier=0.8, mlp_multipliers=[0.7, 1.3],
            ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9])


@pytest.mark.parametrize("tied", [False, True])
def test_folded_multipliers_stated_once(zoo, tied):
    """Falcon-H1's muP multipliers (every released Falcon-H1 has them): mlx-lm multiplies them into the weights at
    conversion, so the export states them as 1 (a tied head keeps lm_head / embedding) and transformers computes
    MLX's logits instead of applying them a second time (logits off by 0.7 before)."""
    arch = get_arch({"model_type": "falcon_h1"})
    base = zoo.mlx("falcon_h1", tie_word_embeddings=tied, **_MUP)
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    out = exported(base)
    close(torch_logits(load(out, arch), ids), zoo.logits(base, ids=ids), f"falcon_h1 tied={tied}")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"falcon_h1 lora tied={tied}")


def test_hf_layout_base_refused(zoo, tmp_path):
    """An HF checkpoint as the base of a type whose sanitize transposes conv weights (and folds Falcon-H1's
    multipliers): mlx-lm converts it as it loads it; the export says so in one line and writes nothing (it used to
    write the conv weight transposed the wrong way)."""
    from mlx_bridge import export
    from mlx_bridge.errors import BridgeError

    with pytest.raises(BridgeError, match=r"conv1d.weight \(\d+, 1, 4\) is a conv weight as transformers saves it"):
        export(str(zoo.hf("falcon_h1")), str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


# types whose rules come with the biases an optional switch adds (derive_more.optional_rules); a sample by default
_SWITCHED = [("llama", dict(attention_bias=True, mlp_bias=True)), ("granite", dict(attention_bias=True)),
             ("olmo2", dict(attention_bias=True))]
_SWITCHED += [pytest.param(t, {f: True}, marks=pytest.mark.slow) for t, f in (
    ("smollm3", "mlp_bias"), ("minicpm3", "attention_bias"), ("helium", "mlp_bias"), ("hunyuan_v1_dense", "attention_bias"),
    ("cohere", "attention_bias"), ("deepseek_v3", "attention_bias"), ("glm4_moe", "attention_bias"), ("olmoe", "attention_bias"),
    ("seed_oss", "attention_bias"), ("exaone", "attention_bias"), ("nemotron", "mlp_bias"))]


@pytest.mark.parametrize("model_type, switches", _SWITCHED)
def test_optional_switches(zoo, model_type, switches):
    """A checkpoint with the bias switches on (llama's attention_bias / mlp_bias, as some fine-tunes ship) exports
    with parity: the rules were traced on a second tiny model with the switches on (the biases were unknown keys)."""
    arch = get_arch({"model_type": model_type})
    base = zoo.mlx(model_type, **switches)
    assert any(k.endswith("_proj.bias") for k in read_tensors(base)), "no bias in the checkpoint"
    ids = probe_ids(hf_config(base)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    close(torch_logits(load(exported(ad), arch), ids), zoo.logits(base, ad, ids=ids), f"{model_type} {switches}")
