"""Issue 2, `--format peft`: `PeftModel.from_pretrained(hf_base, out)` computes what MLX computed with the
adapter; the config says r, lora_alpha = scale*r, and exactly the modules and layers MLX adapted; what
vLLM cannot serve is said in a warning."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from mlx_bridge.cli import main as cli
from mlx_bridge.formats import load_file
from test_export_common import (MOE, adapter_targets, assert_close, exported, ids_for, load_hf, torch_logits,
                                zoo)  # noqa: F401


def peft_model(hf_base, out, same_keys: bool = True, loader=None):
    """PeftModel on `hf_base` (loaded by `loader`, default `load_hf`); fails on missing adapter keys (PEFT's warning)
    or, with `same_keys`, on keys PEFT would not save (MoE: transformers fuses the experts and PEFT converts the
    per-expert keys)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained((loader or load_hf)(hf_base), str(out)).eval()
    missing = [str(x.message) for x in w if "missing adapter keys" in str(x.message)]
    assert not missing, missing[0]
    if not same_keys:
        return model
    theirs = get_peft_model_state_dict(model, save_embedding_layers=False)
    ours = load_file(out / "adapter_model.safetensors")
    assert set(ours) == set(theirs), f"only in file: {sorted(set(ours) - set(theirs))[:5]}, " \
                                     f"only in PEFT: {sorted(set(theirs) - set(ours))[:5]}"
    for k, v in ours.items():  # loaded as written (float32 adapters stay float32)
        assert np.array_equal(theirs[k].float().numpy(), v.astype(np.float32)), k
    return model


def wrapped_modules(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def mlx_modules(adapter) -> set[str]:
    return {t.removesuffix(".weight") for t in adapter_targets(adapter)}


CASES = {  # name -> (arch, quant, make_adapter kwargs)
    "lora": ("llama", None, dict(rank=4, num_layers=2)),
    "lora-qv-last": ("llama", None, dict(rank=2, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1)),
    "lora-emb-head": ("llama", None, dict(rank=4, keys=["self_attn.q_proj", "self_attn.v_proj", "lm_head",
                                                          "model.embed_tokens"], num_layers=1)),
    "dora": ("qwen2", None, dict(fine_tune_type="dora", rank=4)),
    "qlora": ("llama", dict(bits=4, group_size=64), dict(rank=4)),
    "lora-phi3": ("phi3", None, dict(rank=4, scale=8.0)),
    "lora-qwen3_moe": ("qwen3_moe", None, dict(rank=4)),  # router + switch_mlp experts
    "lora-mixtral": ("mixtral", None, dict(rank=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_matches_mlx(zoo, case):
    arch, quant, kw = CASES[case]
    base = zoo.mlx(arch, quant=quant)
    ad = zoo.adapter(base, case, **kw)
    out = exported(ad, format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    acfg = json.loads((ad / "adapter_config.json").read_text())["lora_parameters"]
    assert cfg["peft_type"] == "LORA" and cfg["r"] == acfg["rank"]
    assert cfg["lora_alpha"] == pytest.approx(acfg["scale"] * acfg["rank"]) and not cfg.get("use_rslora")
    assert bool(cfg.get("use_dora")) == (kw.get("fine_tune_type") == "dora")
    assert not cfg.get("modules_to_save")
    moe = arch in MOE
    model = peft_model(exported(base), out, same_keys=not moe)  # on the HF export of the (dequantized) base
    if not moe:
        assert wrapped_modules(model) == mlx_modules(ad), "target_modules/layers_to_transform select other modules"
    assert_close(torch_logits(model, ids_for(base)), zoo.logits(base, ad), what=f"peft {case}")


def test_peft_keys_and_transposes(zoo):
    """lora_A = lora_aᵀ (r, in), lora_B = lora_bᵀ (out, r), DoRA m -> lora_magnitude_vector."""
    base = zoo.mlx("qwen2")
    ad = zoo.adapter(base, "dora", fine_tune_type="dora", rank=4)
    out = exported(ad, format="peft")
    mlx, peft = load_file(ad / "adapters.safetensors"), load_file(out / "adapter_model.safetensors")
    assert len(peft) == len(mlx)
    for k, v in mlx.items():
        mod, leaf = k.rsplit(".", 1)
        name = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}[leaf]
        got = peft[f"base_model.model.{mod}.{name}"]
        want = v if leaf == "m" else v.T
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{k} -> {name}"


def _export_text(capsys, *argv) -> tuple[int, str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc = cli(["export", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err + "\n".join(str(x.message) for x in w)


def test_peft_dora_warns_about_vllm(zoo, tmp_path, capsys):
    base = zoo.mlx("qwen2")
    ad = zoo.adapter(base, "dora", fine_tune_type="dora", rank=4)
    rc, text = _export_text(capsys, ad, "--out", tmp_path / "o", "--format", "peft")
    assert rc == 0 and (tmp_path / "o" / "adapter_model.safetensors").exists()
    assert "DoRA" in text and "vLLM" in text and "--format hf" in text, text
    magnitudes = [line for line in text.splitlines() if "DoRA magnitude" in line]
    n = 2 * 7  # 2 blocks x 7 linear layers, one magnitude vector each
    assert len(magnitudes) == 1 and f"{n} tensors are DoRA magnitude" in magnitudes[0], magnitudes  # one line, not 14


def test_peft_rank_above_16_warns_about_vllm(zoo, tmp_path, capsys):
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-r32", rank=32, keys=["self_attn.q_proj"], num_layers=1)
    rc, text = _export_text(capsys, ad, "--out", tmp_path / "o", "--format", "peft")
    assert rc == 0
    assert "32" in text and "vLLM" in text and "max-lora-rank" in text.replace("_", "-"), text


def test_peft_moe_lora_warns_about_vllm(zoo, tmp_path, capsys):
    base = zoo.mlx("qwen3_moe")
    ad = zoo.adapter(base, "lora-qwen3_moe", rank=4)
    rc, text = _export_text(capsys, ad, "--out", tmp_path / "o", "--format", "peft")
    assert rc == 0 and "MoE" in text and "vLLM" in text and "--format hf" in text, text


def test_peft_refuses_full_finetune(zoo, tmp_path, capsys):
    base = zoo.mlx("qwen3")
    ad = zoo.adapter(base, "full", fine_tune_type="full", num_layers=1)
    rc = cli(["export", str(ad), "--out", str(tmp_path / "o"), "--format", "peft"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "adapters.safetensors" in err or str(ad) in err, err
    assert not (tmp_path / "o").exists()


def test_peft_plain_lora_has_no_vllm_warning(zoo, tmp_path, capsys):
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    rc, text = _export_text(capsys, ad, "--out", tmp_path / "o", "--format", "peft")
    assert rc == 0 and "vLLM" not in text, text
