"""Issue 2, the export directory: HF layout files, index and shards, manifest, tokenizer and chat template,
`--dry-run`, and a translator that imports neither mlx nor torch."""

from __future__ import annotations

import json
import subprocess
import sys

from mlx_bridge.cli import main as cli
from mlx_bridge.formats import read_header
from mlx_bridge.hashing import hash_file
from mlx_bridge.manifest import Manifest
from test_export_common import (assert_close, exported, hf_config, ids_for, load_hf, read_tensors, run_export,
                                torch_logits, zoo)  # noqa: F401


def check_index(out) -> dict:
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    shards = sorted(out.glob("model*.safetensors"))
    seen, total = {}, 0
    for f in shards:
        tensors, _, _ = read_header(f)
        total += sum(t.nbytes for t in tensors.values())
        seen.update({k: f.name for k in tensors})
    assert wm == seen, "weight_map does not say where each tensor is"
    assert idx["metadata"]["total_size"] == total
    return idx


def test_hf_layout_files(zoo):
    base = zoo.mlx("qwen3_moe")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    out = exported(ad)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
              "manifest.json", "model.safetensors.index.json"):
        assert (out / f).is_file(), f"missing {f}"
    check_index(out)
    cfg = hf_config(out)
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "quantization" not in cfg and "quantization_config" not in cfg


def test_tokenizer_and_chat_template_come_along(zoo):
    from transformers import AutoTokenizer

    base = zoo.mlx("llama")
    out = exported(base)
    src, dst = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "give three tips"}]
    assert dst.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        src.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert dst("hello what is the answer").input_ids == src("hello what is the answer").input_ids


def test_manifest_export_section(zoo):
    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    out = exported(ad)
    m = Manifest.load(out)
    assert m.kind == "export"
    ex = m.export
    assert ex.get("format") == "hf" and ex.get("dtype") == "float32", ex
    files = ex.get("files") or m.files
    assert files, "the manifest lists no output files with their hashes"
    for name, sha in files.items():
        assert hash_file(out / name) == sha, f"{name}: hash in the manifest is wrong"
    assert {f.name for f in out.glob("model*.safetensors")} <= set(files)


def test_sharding(zoo, tmp_path):
    """A small shard size: several `model-0000i-of-0000N.safetensors`, each within the limit unless one
    tensor alone is larger; the index is right and transformers loads it."""
    base = zoo.mlx("llama")
    limit = 40_000
    out = run_export(base, tmp_path / "o", shard_size="40KB")
    shards = sorted(out.glob("model*.safetensors"))
    n = len(shards)
    assert n > 2 and [f.name for f in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for f in shards:
        tensors, _, start = read_header(f)
        data = sum(t.nbytes for t in tensors.values())
        assert data <= limit or len(tensors) == 1, f"{f.name}: {data} bytes of tensors in {len(tensors)} tensors"
    check_index(out)
    assert read_tensors(out) == read_tensors(exported(base))
    assert_close(torch_logits(load_hf(out), ids_for(base)), zoo.logits(base), what="sharded llama")


def test_dry_run_prints_the_plan_and_writes_nothing(zoo, tmp_path, capsys):
    base = zoo.mlx("mixtral")
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    out = tmp_path / "o"
    assert cli(["export", str(ad), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and not list(tmp_path.iterdir()), "dry run wrote something"
    real = read_tensors(exported(ad))
    lines = [ln for ln in text.splitlines() if ln.split() and ln.split()[0] in real]
    assert sorted(ln.split()[0] for ln in lines) == sorted(real), "not one line per output tensor"
    by_name = {ln.split()[0]: ln for ln in lines}
    for name, (dt, shape, _) in real.items():
        ln = by_name[name]
        assert any(s in ln for s in (str(list(shape)), str(tuple(shape)), "x".join(map(str, shape)))), ln
        assert dt in ln or {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dt] in ln, ln
    fused = by_name["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert "switch_mlp.down_proj" in fused and "lora" in fused.lower(), f"does not say what it is made of: {fused}"


def test_translator_imports_neither_mlx_nor_torch(zoo, tmp_path):
    """4-bit MoE + LoRA to HF and 4-bit dense + LoRA to PEFT, in a fresh interpreter."""
    moe = zoo.adapter(zoo.mlx("qwen3_moe", quant=dict(bits=4, group_size=32)), "qlora", rank=4)
    dense = zoo.adapter(zoo.mlx("llama", quant=dict(bits=4, group_size=64)), "qlora", rank=4)
    code = ("import sys; from mlx_bridge import export; "
            f"export({str(moe)!r}, {str(tmp_path / 'o')!r}); "
            f"export({str(dense)!r}, {str(tmp_path / 'p')!r}, format='peft'); "
            "bad = sorted(m for m in ('mlx', 'mlx_lm', 'torch', 'transformers') if m in sys.modules); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_tensors(tmp_path / "o") == read_tensors(exported(moe))
