"""Issue 2 parity: MLX model (+ adapter) -> `export` -> transformers computes what MLX computed.

For every architecture: a random HF model -> mlx-lm's convert (float32) -> an mlx-lm adapter with
non-zero weights -> export -> `AutoModelForCausalLM.from_pretrained` with clean loading info -> logits
equal MLX's (with the adapter) to float32 rounding. Untouched tensors must be the source bytes.
"""

from __future__ import annotations

import json

import pytest

from mlx_bridge.manifest import Manifest
from mlx_bridge.testing.adapters import make_checkpoint
from test_export_common import (ARCHS, adapter_targets, as_array, assert_close, check_copied, exported, hf_config,
                                ids_for, load_hf, read_tensors, run_export, torch_logits, zoo)  # noqa: F401

MLX_ONLY_KEYS = ("quantization", "quantization_config")


def check_config(out, base):
    cfg = hf_config(out)
    assert not set(MLX_ONLY_KEYS) & set(cfg), f"{out}/config.json keeps {set(MLX_ONLY_KEYS) & set(cfg)}"
    assert cfg["architectures"] == hf_config(base)["architectures"]
    assert cfg.get("dtype", cfg.get("torch_dtype")) is not None, "config.json states no dtype"
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_export_is_exact(zoo, arch):
    """No adapter: every tensor is copied byte for byte (MoE experts unstacked) and HF logits equal MLX's."""
    base = zoo.mlx(arch)
    out = exported(base)
    check_config(out, base)
    used = check_copied(out, base)
    assert used == set(read_tensors(base)), f"MLX tensors not exported: {set(read_tensors(base)) - used}"
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what=f"{arch} plain")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_export_matches_mlx(zoo, arch):
    """mlx-lm's default targets (every linear of every block: attention, MLP, MoE router, switch_mlp)."""
    base = zoo.mlx(arch)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    out = exported(ad)
    check_config(out, base)
    check_copied(out, base, touched=adapter_targets(ad))
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what=f"{arch} lora")


def test_lora_changes_only_targeted_layers(zoo):
    """q/v LoRA on the last block only: everything else is the source bytes, and the fused weight differs."""
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-qv-last", keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1, rank=2)
    targets = adapter_targets(ad)
    assert targets == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    out = exported(ad)
    check_copied(out, base, touched=targets)
    src, dst = read_tensors(base), read_tensors(out)
    for t in targets:
        assert dst[t][:2] == src[t][:2] and dst[t][2] != src[t][2], f"{t}: the adapter was not fused"
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="llama q/v last layer")


def test_dora_export_matches_mlx(zoo):
    """DoRA (magnitude `m`) on qwen2, whose q/k/v have biases."""
    base = zoo.mlx("qwen2")
    ad = zoo.adapter(base, "dora", fine_tune_type="dora", rank=4)
    out = exported(ad)
    check_copied(out, base, touched=adapter_targets(ad))
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="qwen2 dora")


def test_embedding_and_lm_head_lora(zoo):
    """Top-level keys: `model.embed_tokens` (LoRAEmbedding) and `lm_head`, plus q/v in the last block."""
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-emb-head", keys=["self_attn.q_proj", "self_attn.v_proj", "lm_head",
                                                 "model.embed_tokens"], num_layers=1, rank=4)
    targets = adapter_targets(ad)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= targets
    out = exported(ad)
    check_copied(out, base, touched=targets)
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="llama embed/lm_head lora")


def test_tied_embedding_lora(zoo):
    """gemma2 ties lm_head to embed_tokens: the embedding LoRA acts on input and output in MLX."""
    base = zoo.mlx("gemma2")
    ad = zoo.adapter(base, "lora-emb", keys=["model.embed_tokens", "mlp.down_proj"], num_layers=1, rank=4)
    out = exported(ad)
    assert "lm_head.weight" not in read_tensors(out)
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="gemma2 tied embedding lora")


def test_full_finetune_export(zoo):
    """`full` adapter (last block's tensors, norms included): those tensors replace the base's, byte for byte."""
    base = zoo.mlx("qwen3")
    ad = zoo.adapter(base, "full", fine_tune_type="full", num_layers=1)
    out = exported(ad)
    targets = adapter_targets(ad)
    assert any("norm" in t for t in targets) and all(t.startswith("model.layers.1.") for t in targets)
    check_copied(out, base, touched=targets)
    check_copied(out, ad, touched=set(read_tensors(base)) - targets)  # adapter tensors copied as they are
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="qwen3 full")


def test_checkpoint_dir_source(zoo, tmp_path):
    """A checkpoint dir: the manifest's base_model.path names the base (the adapter config's `model` is stale);
    probes are copied, the manifest gains an `export` section and keeps the checkpoint's sections."""
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-stale", rank=4, model_field="/nonexistent/moved-away-base")
    ckpt = make_checkpoint(ad, tmp_path / "ckpt", base=base)
    out = run_export(ckpt, tmp_path / "out")
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="checkpoint export")
    assert (out / "probes.safetensors").read_bytes() == (ckpt / "probes.safetensors").read_bytes()
    m, c = Manifest.load(out), Manifest.load(ckpt)
    assert m.kind == "export" and m.export, "manifest.json needs kind 'export' and an export section"
    assert m.adapter == c.adapter and m.base_model["path"] == c.base_model["path"]


def test_base_override(zoo, tmp_path):
    """`base=` wins over the adapter config's `model` (which here points nowhere)."""
    base = zoo.mlx("mistral")
    ad = zoo.adapter(base, "lora-moved", rank=4, model_field="/nonexistent/moved-away-base")
    out = run_export(ad, tmp_path / "out", base=str(base))
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base, ad), what="mistral --base")


def test_python_api_returns_out_dir(zoo, tmp_path):
    base = zoo.mlx("llama")
    out = run_export(base, tmp_path / "o")
    assert out == tmp_path / "o" and (out / "config.json").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == hf_config(base)["eos_token_id"]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_sliding_window_archs_past_the_window(zoo, arch):
    """Probes longer than the sliding window (32): the exported config must give the attention MLX used."""
    from mlx_bridge.testing.adapters import probe_ids

    base = zoo.mlx(arch)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    cfg = hf_config(base)
    ids = probe_ids(cfg["vocab_size"], n=1, length=2 * cfg["sliding_window"] + 8, seed=7)
    assert_close(torch_logits(load_hf(exported(ad)), ids), zoo.logits(base, ad, ids=ids), what=f"{arch} long probe")
