"""Issue 4, third-party readiness: `compat.check_export` accepts what vLLM / TensorRT-LLM load and names
what they would refuse, on real directories: transformers' own save, PEFT's own save, mlx-lm's own
(quantized) output, this project's exports, and deliberately broken copies of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.translate.compat import check_export, lora_rank_flag, serve_commands, serving_notes
from mlx_bridge.formats import SafetensorsFile, load_file, save_file
from mlx_bridge.testing import tiny_hf_model
from mlx_bridge.testing.adapters import shared_zoo


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("tp") / "llama", "llama")


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory, hf_dir) -> dict[str, Path]:
    """Adapters saved by PEFT itself: plain LoRA r=8, r=32, DoRA, and one with modules_to_save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    cases = {
        "lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "r32": dict(r=32, lora_alpha=64, target_modules=["q_proj", "down_proj"]),
        "dora": dict(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True),
        "save": dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    out = {}
    for name, kw in cases.items():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(hf_dir))
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kw))
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def broken(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    return d


def edit_json(p: Path, **changes) -> None:
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def one(problems: list[str], *words: str) -> str:
    """The single problem, which must mention every word."""
    assert len(problems) == 1, problems
    assert all(w in problems[0] for w in words), problems[0]
    return problems[0]


# -- full model directories ----------------------------------------------------------------------------

def test_transformers_save_is_ready(hf_dir):
    assert check_export(hf_dir) == []
    cmds = serve_commands(hf_dir)
    assert cmds["vllm"] == f"vllm serve {hf_dir}" and cmds["trtllm"] == f"LLM(model={str(hf_dir)!r})"


@pytest.mark.parametrize("case", ["no-architectures", "arch-mismatch", "quantization", "no-dtype", "auto-map"])
def test_config_problems(hf_dir, tmp_path, case):
    d = broken(hf_dir, tmp_path)
    change, words = {
        "no-architectures": ({"architectures": None}, ["architectures"]),
        "arch-mismatch": ({"architectures": ["Qwen2ForCausalLM"]}, ["Qwen2ForCausalLM", "LlamaForCausalLM"]),
        "quantization": ({"quantization": {"group_size": 64, "bits": 4},
                          "quantization_config": {"group_size": 64, "bits": 4}}, ["quantization"]),
        "no-dtype": ({"dtype": None}, ["dtype"]),
        "auto-map": ({"auto_map": {"AutoModelForCausalLM": "modeling.Custom"}}, ["trust_remote_code"]),
    }[case]
    edit_json(d / "config.json", **change)
    problems = check_export(d)
    if case == "quantization":
        assert len(problems) == 2 and all("MLX quantization" in p for p in problems), problems
    else:
        one(problems, "config.json", *words)


@pytest.mark.parametrize("missing", ["tokenizer.json", "generation_config.json", "config.json"])
def test_missing_files(hf_dir, tmp_path, missing):
    d = broken(hf_dir, tmp_path)
    (d / missing).unlink()
    problems = check_export(d)
    assert any(missing.split(".")[0] in p for p in problems), problems


def test_extra_safetensors_needs_index(hf_dir, tmp_path):
    """vLLM loads every *.safetensors without an index: probes beside the weights need one."""
    d = broken(hf_dir, tmp_path)
    save_file({"input_ids": np.zeros((2, 4), np.int32)}, d / "probes.safetensors", {"format": "pt"})
    one(check_export(d), "model.safetensors.index.json", "probes.safetensors")
    with SafetensorsFile(d / "model.safetensors") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert check_export(d) == []
    # an index that lies about the shard is caught both ways
    wm = dict(weight_map, **{"model.ghost.weight": "model.safetensors"})
    wm.pop("lm_head.weight")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    problems = check_export(d)
    assert len(problems) == 2 and any("model.ghost.weight" in p for p in problems) \
        and any("lm_head.weight" in p for p in problems), problems
    ghost_shard = {"weight_map": {"lm_head.weight": "model-2.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(ghost_shard))
    assert any("model-2.safetensors, which does not exist" in p for p in check_export(d))


@pytest.mark.parametrize("case", ["format-mlx", "mlx-keys", "dtype-lie", "pickle"])
def test_weight_problems(hf_dir, tmp_path, case):
    d = broken(hf_dir, tmp_path)
    w = load_file(d / "model.safetensors")
    if case == "format-mlx":
        save_file(w, d / "model.safetensors", {"format": "mlx"})
        one(check_export(d), "model.safetensors", "'mlx'")
    elif case == "mlx-keys":
        w["model.layers.0.mlp.up_proj.scales"] = np.ones((128, 1), np.float32)
        save_file(w, d / "model.safetensors", {"format": "pt"})
        one(check_export(d), "MLX-layout", "up_proj.scales")
    elif case == "dtype-lie":
        edit_json(d / "config.json", dtype="bfloat16")
        one(check_export(d), "bfloat16", "F32")
    else:
        (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
        one(check_export(d), "pytorch_model.bin", "pickle")


def test_notes_for_float32_v5_config(hf_dir):
    notes = serving_notes(hf_dir)
    assert any("--dtype float32" in n for n in notes), notes
    assert any("rope_theta" in n for n in notes), notes  # tiny_hf_model writes transformers v5's rope_parameters


# -- PEFT adapters -------------------------------------------------------------------------------------

def test_peft_save_is_ready(peft_dirs):
    assert check_export(peft_dirs["lora"]) == []
    assert serving_notes(peft_dirs["lora"]) == []
    cmd = serve_commands(peft_dirs["lora"], base="meta-llama/Llama-2-7b-hf", name="alpaca")["vllm"]
    assert cmd == (f"vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules alpaca={peft_dirs['lora']} "
                   "--max-lora-rank 8")


def test_peft_rank_above_vllm_default(peft_dirs):
    d = peft_dirs["r32"]
    assert check_export(d) == []  # loadable once served with the flag ...
    assert any("--max-lora-rank 32" in n for n in serving_notes(d))
    one(check_export(d, max_lora_rank=16), "r=32", "max_lora_rank 16")  # ... and refused without it
    assert "--max-lora-rank 32" in serve_commands(d)["vllm"]


def test_peft_dora_and_modules_to_save_refused(peft_dirs):
    dora = check_export(peft_dirs["dora"])
    assert any("use_dora" in p for p in dora) and any("DoRA magnitude" in p for p in dora), dora
    save = check_export(peft_dirs["save"])
    assert any("modules_to_save" in p and "lm_head" in p for p in save), save
    assert any("lm_head" in p and "full weight" in p for p in save), save


@pytest.mark.parametrize("case", ["no-alpha", "targets", "bias", "rank-pattern", "format"])
def test_peft_config_problems(peft_dirs, tmp_path, case):
    d = broken(peft_dirs["lora"], tmp_path)
    cfg = d / "adapter_config.json"
    if case == "no-alpha":
        edit_json(cfg, lora_alpha=None)
        one(check_export(d), "lora_alpha", "required")
    elif case == "targets":  # tensors for v_proj that PEFT would not load
        edit_json(cfg, target_modules=["q_proj"])
        problems = check_export(d)
        assert problems and all("v_proj" in p and "target_modules" in p for p in problems), problems
    elif case == "bias":
        edit_json(cfg, bias="all")
        one(check_export(d), "bias")
    elif case == "rank-pattern":
        edit_json(cfg, rank_pattern={"q_proj": 4})
        one(check_export(d), "rank_pattern")
    else:
        w = load_file(d / "adapter_model.safetensors")
        save_file(w, d / "adapter_model.safetensors", {"format": "mlx"})
        one(check_export(d), "adapter_model.safetensors", "format")


def test_peft_unsupported_module(peft_dirs, tmp_path):
    d = broken(peft_dirs["lora"], tmp_path)
    w = load_file(d / "adapter_model.safetensors")
    w = {k.replace("self_attn.q_proj", "self_attn.rotary"): v for k, v in w.items()}
    save_file(w, d / "adapter_model.safetensors", {"format": "pt"})
    edit_json(d / "adapter_config.json", target_modules=["rotary", "v_proj"])
    problems = check_export(d)
    assert problems and all("rotary" in p and "not a layer" in p for p in problems), problems


def test_rank_flag_values():
    assert [lora_rank_flag(r) for r in (1, 2, 8, 9, 16, 17, 64, 300, 512)] == [1, 8, 8, 16, 16, 32, 64, 320, 512]
    with pytest.raises(Exception, match="512"):
        lora_rank_flag(513)


# -- mlx-lm's own output and this project's exports ----------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def test_mlx_quantized_dir_is_refused(zoo):
    """What mlx-lm writes for a 4-bit model is exactly what the engines cannot take."""
    problems = check_export(zoo.mlx("llama", quant=dict(bits=4, group_size=64)))
    text = "\n".join(problems)
    for word in ("quantization_config", "'mlx'", "MLX-layout"):
        assert word in text, problems


EXPORTS = {  # name -> (arch, base quantization, make_adapter kwargs, a note serving_notes must give for the PEFT dir)
    "qlora": ("llama", dict(bits=4, group_size=64), dict(rank=4, num_layers=2), None),
    "emb-head": ("llama", None, dict(rank=4, keys=["self_attn.q_proj", "self_attn.v_proj", "lm_head",
                                                 "model.embed_tokens"], num_layers=1), "embed_tokens/lm_head"),
    "moe": ("qwen3_moe", None, dict(rank=4), "MoE experts"),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_exports_are_ready(zoo, tmp_path, case):
    """This project's exports, merged (hf) and as an adapter (peft), pass unchanged."""
    from mlx_bridge import export

    arch, quant, kw, note = EXPORTS[case]
    base = zoo.mlx(arch, quant=quant)
    adapter = zoo.adapter(base, f"tp-{case}", **kw)
    quiet = dict(verify=False, progress=False, log=lambda *a: None)
    hf = export(adapter, tmp_path / "hf", format="hf", dtype="bfloat16", **quiet)
    assert check_export(hf) == []
    peft = export(adapter, tmp_path / "peft", format="peft", **quiet)
    assert check_export(peft) == []
    notes = serving_notes(peft)
    assert (note is None and notes == []) or any(note in n for n in notes), notes
