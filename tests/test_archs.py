"""Issue 10: the registry — derived data matches what mlx-lm and transformers give today, imports without
them, refuses unknown types in one line, and docs/architectures.md is what the registry says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_bridge.archs import DERIVED_DIR, get_arch, refused, supported
from mlx_bridge.errors import BridgeError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_registry_imports_without_frameworks():
    """The translator's view of the registry needs neither torch, mlx nor transformers."""
    code = ("import sys\nfor m in ('torch', 'mlx', 'mlx_lm', 'transformers'): sys.modules[m] = None\n"
            "import mlx_bridge.translate.plan, mlx_bridge.translate.export\n"
            "from mlx_bridge.archs import get_arch\nprint(get_arch({'model_type': 'granitemoe'}).architecture)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "GraniteMoeForCausalLM", out.stderr[-2000:]


def test_unknown_and_refused_types_are_named():
    with pytest.raises(BridgeError, match=r"model_type 'no_such_type' is not supported .*docs/architectures.md"):
        get_arch({"model_type": "no_such_type"})
    t, why = next(iter(refused().items()))
    with pytest.raises(BridgeError, match=rf"model_type '{t}' is not supported \(.*docs/architectures.md"):
        get_arch({"model_type": t})


def test_hf_classes_are_transformers_own():
    from transformers.models.auto import modeling_auto as ma

    names = {**ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}  # multimodal first
    bad = {t: get_arch({"model_type": t}).architecture for t in supported()
           if get_arch({"model_type": t}).architecture != names.get(t)}
    assert not bad, bad


def test_docs_table_is_generated():
    from mlx_bridge.archs.docs import render

    assert (ROOT / "docs/architectures.md").read_text() == render(), "run: python scripts/derive_archs.py --docs"


def test_all_derived_data_matches_mlx_lm():
    """Every mlx-lm type with a transformers class, rederived from the installed mlx-lm and transformers
    (about 40 s on 2 cores): a new release shows up here as a diff, not as a wrong export."""
    pytest.importorskip("mlx_lm")
    from derive_archs import main

    assert main(["--check"]) == 0, "run python scripts/derive_archs.py and review the diff"


def test_every_derived_file_is_one_type():
    for p in DERIVED_DIR.glob("*.json"):
        d = json.loads(p.read_text())
        assert d["model_type"] == p.stem and ("refused" in d or d["hf"]), p


def test_one_hub_id_rule(tmp_path, monkeypatch):
    """translate/source.py and train/model.py ask the same `is_hub_id`."""
    from mlx_bridge.fsutil import is_hub_id
    from mlx_bridge.translate.source import resolve_model

    assert is_hub_id("mlx-community/Qwen3-0.6B-4bit") and is_hub_id("gpt2")
    for ref in ("./llama", "/abs/llama", "~/llama", "a/b/c", "a/../b", "a--b/c", ""):
        assert not is_hub_id(ref), ref
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert not is_hub_id("org/model")  # an existing directory is a path
    assert resolve_model("org/model", "x") == Path("org/model")
    with pytest.raises(BridgeError, match="not a directory \\(and not a hub id\\)"):
        resolve_model("a/b/c", "adapter_config.json")
    pytest.importorskip("mlx_lm")
    from mlx_bridge.train.model import load_base

    with pytest.raises(BridgeError, match="no such directory"):
        load_base("a/b/c")  # not a hub id by the same rule: no download is tried


def test_effective_config_states_what_mlx_computed():
    """Config facts the parity tests found, checked without a model: mlx-lm's YarnRoPE always rounds its
    correction range (gpt-oss ships truncate false); a v5 scaling dict's own rope_theta is not what mlx-lm reads;
    granitemoehybrid's null position_embedding_type is rope to mlx-lm; a wrapper's text_config without
    rope_theta is computed with the text module's default (qwen2_vl: qwen2's 1e6)."""
    from mlx_bridge.translate.hf_config import effective_config

    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0}
    c, notes = effective_config({"model_type": "gpt_oss", "rope_scaling": yarn, "rope_parameters": yarn},
                                get_arch({"model_type": "gpt_oss"}), "float32")
    assert c["rope_theta"] == 150000 and c["rope_parameters"]["rope_theta"] == 150000  # mlx-lm's default
    assert c["rope_parameters"]["truncate"] is True and c["rope_scaling"]["truncate"] is True
    assert any("truncate=True" in n for n in notes) and any("rope_theta=150000" in n for n in notes)
    c, notes = effective_config({"model_type": "granitemoehybrid", "position_embedding_type": None},
                                get_arch({"model_type": "granitemoehybrid"}), "float32")
    assert c["position_embedding_type"] == "rope" and any("position_embedding_type" in n for n in notes)
    tc = {"model_type": "qwen2_vl_text", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [2, 3, 3]}}
    c, notes = effective_config({"model_type": "qwen2_vl", "text_config": tc}, get_arch({"model_type": "qwen2_vl"}),
                                "float32")
    assert c["text_config"]["rope_parameters"] == {**tc["rope_parameters"], "rope_theta": 1000000}
    assert tc["rope_parameters"]["rope_theta"] == 10000.0  # the source config is not changed
