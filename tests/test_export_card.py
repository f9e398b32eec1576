"""The export's model card (front matter, training facts, parity, usage) and the PEFT export's tokenizer."""

from __future__ import annotations

import json

import pytest

from mlx_bridge import MLXTrainer, export
from mlx_bridge.hashing import hash_file
from mlx_bridge.manifest import Manifest
from mlx_bridge.testing import mlx_convert, tiny_hf_model
from mlx_bridge.testing.train import write_split_dir
from mlx_bridge.translate.card import base_hub_id, hub_id_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = mlx_convert(tiny_hf_model(root / "hf", "llama", seed=1), root / "mlx")
    data = write_split_dir(root / "data", "chat", n_train=8, n_valid=4)
    tr = MLXTrainer(str(base), str(data), lora_rank=2, learning_rate=1e-2, batch_size=4, quiet=True)
    tr.train(iters=2)
    return tr.save_checkpoint(root / "ckpt"), base, tr.summary()


def front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_hf_card_states_training_parity_and_usage(trained, tmp_path):
    ckpt, base, summary = trained
    out = export(ckpt, tmp_path / "alpaca", log=lambda *_: None)
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert "base_model" not in meta and str(base) not in text.split("---")[1]  # a local base: no hub id to give
    assert meta["library_name"] == "transformers" and "mlx-bridge" in meta["tags"] and "lora" in meta["tags"]
    assert "rank 2, scale 20" in text and "chat format" in text and "8 train" in text
    assert "learning_rate 0.01" in text and "batch_size 4" in text and "seed 0" in text
    assert f"train {summary['final_train_loss']:.4f}" in text and f"validation {summary['final_valid_loss']:.4f}" in text
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and "**PASS**" in text and f"{report['logits']['max_abs_diff']:.3g}" in text
    assert "Not checked yet" not in text
    assert 'AutoModelForCausalLM.from_pretrained("alpaca")' in text and "vllm serve alpaca" in text
    files = Manifest.load(out).export["files"]  # the card is filled in after the hashes: not among them
    assert "README.md" not in files and all(hash_file(out / n) == h for n, h in files.items())


def test_card_names_the_hub_base_and_peft_export_carries_the_tokenizer(trained, tmp_path):
    from transformers import AutoTokenizer

    ckpt, base, _ = trained
    hub_ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(ckpt, hub_ckpt)
    m = Manifest.load(hub_ckpt)
    m.base_model["hub_id"] = "mlx-community/tiny-llama"  # trained from a hub id; its snapshot is the local path
    m.save(hub_ckpt)
    hf = export(hub_ckpt, tmp_path / "hf", verify=False, log=lambda *_: None)
    assert front_matter((hf / "README.md").read_text())["base_model"] == "mlx-community/tiny-llama"
    assert "Not checked yet" in (hf / "README.md").read_text()  # no parity check ran

    pe = export(hub_ckpt, tmp_path / "peft", format="peft", log=lambda *_: None)
    text = (pe / "README.md").read_text()
    assert front_matter(text)["library_name"] == "peft" and front_matter(text)["base_model"] == "mlx-community/tiny-llama"
    assert 'PeftModel.from_pretrained(base, "peft")' in text
    assert "vllm serve mlx-community/tiny-llama --enable-lora --lora-modules adapter=peft" in text
    tok, ref = AutoTokenizer.from_pretrained(str(pe)), AutoTokenizer.from_pretrained(str(base))
    msgs = [{"role": "user", "content": "count on from two"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
    assert tok("one two three").input_ids == ref("one two three").input_ids


def test_hub_ids_from_what_is_known(tmp_path):
    assert hub_id_of("mlx-community/Qwen3-0.6B-4bit") == "mlx-community/Qwen3-0.6B-4bit"
    cache = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "0123abcd"
    cache.mkdir(parents=True)
    assert hub_id_of(str(cache)) == "Qwen/Qwen3-0.6B"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert hub_id_of(str(tmp_path / "org" / "model")) is None
    assert base_hub_id(None, "meta-llama/Llama-3.2-1B", str(tmp_path)) == "meta-llama/Llama-3.2-1B"
    assert base_hub_id(None, None, str(tmp_path)) is None
