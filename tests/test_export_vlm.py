"""Issue 10: a multimodal base converted by mlx-vlm (its vision tower kept under mlx-vlm's names and layouts)
-> LoRA on the language model (mlx-lm) -> export with no --hf-base -> transformers' multimodal class loads it
with a clean loading report, its text logits match MLX's within 1e-3 relative, and every vision / projector
tensor is the HF original's bytes (after undoing mlx-vlm's conv transpose).

The drift test regenerates archs/mlx_vlm.json from the installed mlx-vlm (scripts/derive_vlm.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.archs import get_arch, template
from mlx_bridge.archs.derive_vlm import types
from mlx_bridge.archs.registry import vlm_rules
from mlx_bridge.errors import BridgeError
from mlx_bridge.testing.adapters import probe_ids
from test_export_common import exported, hf_config, read_tensors, zoo  # noqa: F401
from test_export_registry import close, load, torch_logits

pytest.importorskip("mlx_vlm")
ROOT = Path(__file__).resolve().parent.parent
DERIVED = [t for t in types() if "rules" in vlm_rules(t)]  # the list comes from the derived data


def vlm_base(zoo, model_type: str, dtype: str = "float32", q_bits: int = 0) -> Path:
    """`zoo.hf(model_type)` converted by mlx-vlm's own loading and saving (built once a session)."""
    from mlx_bridge.archs.derive_vlm import mlx_vlm_convert

    d = zoo.root / f"mlxvlm-{model_type}-{dtype}-q{q_bits}"
    if not (d / "config.json").exists():
        mlx_vlm_convert(zoo.hf(model_type, dtype=dtype), d, model_type, q_bits=q_bits)
    return d


@pytest.mark.parametrize("model_type", ["gemma3", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_mlx_vlm_4bit_base_lora(zoo, model_type):
    """A 4-bit mlx-vlm base (what mlx-community ships: the language model quantized, the vision tower kept float by
    mlx-vlm's own predicate) under LoRA: text logits within 1e-3 of MLX, vision tensors the HF original's bytes."""
    base = vlm_base(zoo, model_type, q_bits=4)
    assert any(k.endswith(".scales") for k in read_tensors(base)), "the base is not quantized"
    lora_export_matches(zoo, model_type, base, f"{model_type} 4-bit mlx-vlm base, lora")


def lora_export_matches(zoo, model_type: str, base: Path, what: str) -> tuple[Path, dict, dict]:
    """LoRA on `base` exported: text logits within 1e-3 of MLX's, every vision / projector tensor the HF original's
    bytes; (the export, the HF original's tensors, the export's)."""
    arch = get_arch({"model_type": model_type})
    cfg = hf_config(base)
    ids = probe_ids((cfg.get("text_config") or cfg)["vocab_size"], n=1, length=24, seed=3)
    ad = zoo.adapter(base, "lora", rank=4, num_layers=2)
    out = exported(ad)
    close(torch_logits(load(out, arch), ids), zoo.logits(base, ad, ids=ids), what)
    src, dst = read_tensors(zoo.hf(model_type)), read_tensors(out)
    vision = [k for k in src if template(k)[0] in arch.dropped]
    assert vision and [k for k in vision if dst[k] != src[k]] == []
    return out, src, dst


@pytest.mark.parametrize("model_type", DERIVED)
def test_mlx_vlm_base_lora(zoo, model_type):
    base = vlm_base(zoo, model_type)
    keys = read_tensors(base)
    rules = vlm_rules(model_type)["rules"]
    renamed = any(template(k)[0] != r["hf"] for k, r in rules.items())  # minimax_m3_vl: mlx-vlm keeps HF's names
    assert any(template(k)[0] in rules and (template(k)[0] != rules[template(k)[0]]["hf"] or not renamed)
               for k in keys), "the base does not carry mlx-vlm's own names (its vision tensors)"
    out, src, dst = lora_export_matches(zoo, model_type, base, f"{model_type} mlx-vlm base, lora")
    assert set(dst) >= set(src) - {"lm_head.weight"}
    for f in ("preprocessor_config.json", "processor_config.json"):  # the processor travels with the export
        assert not (base / f).exists() or (out / f).read_bytes() == (base / f).read_bytes(), f


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_vl"])
def test_mlx_vlm_bf16_base_vision_bytes(zoo, model_type):
    """bf16 (as hub checkpoints are): mlx-vlm keeps the dtype; each vision tensor, its conv transposed back,
    is the HF original's bytes; the export passes its own check."""
    arch = get_arch({"model_type": model_type})
    out = exported(vlm_base(zoo, model_type, "bfloat16"))
    src, dst = read_tensors(zoo.hf(model_type, dtype="bfloat16")), read_tensors(out)
    vision = [k for k in src if template(k)[0] in arch.dropped]
    assert vision and {src[k][0] for k in vision} == {"BF16"}
    assert [k for k in vision if dst[k] != src[k]] == []


def test_mlx_vlm_base_missing_tower_is_named(zoo, tmp_path):
    """An mlx-vlm base with part of its vision tower gone: one line naming what is missing, nothing written."""
    from mlx_bridge import export
    from mlx_bridge.formats.safetensors import save_file

    base = vlm_base(zoo, "mistral3")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in base.glob("*.json"):
        (cut / f.name).write_bytes(f.read_bytes())
    from test_export_common import as_array

    kept = {k: as_array(t) for k, t in read_tensors(base).items() if "patch_conv" not in k}
    save_file(kept, cut / "model.safetensors")
    (cut / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(BridgeError, match=r"mlx-vlm conversion of mistral3 without vision_tower\.patch_conv"):
        export(str(cut), str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_mlx_vlm_rules_match_mlx_vlm():
    """archs/mlx_vlm.json is what the installed mlx-vlm gives (a new mlx-vlm release shows up as a diff)."""
    r = subprocess.run([sys.executable, "scripts/derive_vlm.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


def test_underived_mlx_vlm_layout_is_one_line(zoo, tmp_path):
    """A base with tensors in names nobody derived, for a type whose mlx-vlm layout is refused (llama4: mlx-vlm
    cannot build its tiny vision tower): one line naming the first key, the count and mlx-vlm's reason."""
    from mlx_bridge import export
    from mlx_bridge.formats.safetensors import save_file
    from test_export_common import as_array

    assert "refused" in vlm_rules("llama4")
    base = zoo.mlx("llama4")
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in base.glob("*.json"):
        (odd / f.name).write_bytes(f.read_bytes())
    t = {k: as_array(v) for k, v in read_tensors(base).items()}
    t.update({f"vision_model.layers.{i}.w.weight": np.ones((2, 2), np.float32) for i in range(3)})
    save_file(t, odd / "model.safetensors")
    (odd / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(BridgeError) as e:
        export(str(odd), str(tmp_path / "o"), progress=False, hf_base=str(zoo.hf("llama4")))
    msg = str(e.value)
    assert "'vision_model.layers.0.w.weight' for model_type 'llama4' and 2 more: a base mlx-vlm converted?" in msg
    assert "vision_feature_layer" in msg and msg.count("unknown key") == 1
    assert not (tmp_path / "o").exists()
