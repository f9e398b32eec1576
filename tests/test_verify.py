"""`verify`: parity of an export with MLX probes computed here with mlx-lm; passes, fails, reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from mlx_bridge.cli import main as cli_main
from mlx_bridge.errors import BridgeError
from mlx_bridge.probes import Probes
from mlx_bridge.testing.adapters import make_checkpoint, probe_ids, shared_zoo
from mlx_bridge.verify import verify
from mlx_bridge.verify.parity import compare_logits, tolerance

G = 8


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def mlx_reference(mlx_dir, ids, adapter=None):
    """Probes made with mlx-lm directly: logits and greedy continuations (no EOS stop)."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import generate_step

    model, _ = mlx_load(str(mlx_dir), adapter_path=adapter and str(adapter))
    logits = np.array(model(mx.array(ids)).astype(mx.float32))
    greedy = np.array([[t for t, _ in generate_step(mx.array(r), model, max_tokens=G)] for r in ids], np.int32)
    return Probes(ids, logits, greedy, dtype="float32")


@pytest.fixture(scope="module")
def export_with_probes(zoo, tmp_path_factory):
    from mlx_bridge import export

    out = export(zoo.mlx("llama"), tmp_path_factory.mktemp("verify") / "llama", log=lambda *a: None,
                 progress=False, verify=False)
    mlx_reference(zoo.mlx("llama"), probe_ids(101, n=3, length=10)).save(out)
    return out


def test_export_passes_and_writes_parity_json(export_with_probes):
    report = verify(export_with_probes)
    assert report["passed"], report["summary"]
    assert report["logits"]["max_abs_diff"] < 1e-4 and report["logits"]["top1_agreement"] == 1.0
    assert report["greedy"]["exact"] == 3 and report["greedy"]["max_new_tokens"] == G
    on_disk = json.loads((export_with_probes / "parity.json").read_text())
    assert on_disk["passed"] and on_disk["reference"]["source"] == "probes.safetensors"
    assert on_disk["deployed"] == {"backend": "native", "device": "cpu", "dtype": "float32"}


def test_each_phase_is_reported_as_it_starts_and_the_card_gets_the_result(export_with_probes):
    lines = []
    report = verify(export_with_probes, log=lines.append)
    assert [line.split(" ")[1] for line in lines] == ["loaded", "logits", "greedy"], lines
    assert "3 probes x 10 tokens" in lines[1] and f"({G} tokens each)" in lines[2]
    card = (export_with_probes / "README.md").read_text()
    assert "**PASS**" in card and f"{report['logits']['max_abs_diff']:.3g}" in card


def test_bfloat16_export_passes_with_the_bfloat16_tolerance(zoo, export_with_probes, tmp_path):
    from mlx_bridge import export

    out = export(zoo.mlx("llama"), tmp_path / "bf16", dtype="bfloat16", log=lambda *a: None, progress=False,
                 verify=False)
    shutil.copy(export_with_probes / "probes.safetensors", out)
    report = verify(out)
    assert report["deployed"]["dtype"] == "bfloat16" and report["logits"]["atol"] == tolerance("bfloat16")[0]
    assert report["passed"], report["summary"]
    assert report["logits"]["max_abs_diff"] > 1e-4  # bf16 rounding is visible, and tolerated


def test_a_wrong_weight_fails(export_with_probes, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(export_with_probes, bad)
    [f] = sorted(bad.glob("model*.safetensors"))
    sd = load_file(str(f))
    sd["model.layers.1.post_attention_layernorm.weight"] = sd["model.layers.1.post_attention_layernorm.weight"] * 1.5
    save_file(sd, str(f), metadata={"format": "pt"})
    assert cli_main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "parity.json" in out
    report = json.loads((bad / "parity.json").read_text())
    assert not report["passed"] and report["logits"]["max_abs_diff"] > report["logits"]["limit"]


def test_a_different_greedy_token_fails(export_with_probes, tmp_path):
    d = tmp_path / "g"
    shutil.copytree(export_with_probes, d)
    p = Probes.load(d)
    p.greedy[1, 3] = (p.greedy[1, 3] + 1) % 101  # not what MLX chose, nor a near-tie
    p.save(d)
    report = verify(d, write=False)
    assert report["logits"]["passed"] and not report["greedy"]["passed"] and not report["passed"]
    probe = report["greedy"]["per_probe"][1]
    assert probe["first_divergence"] == 3 and probe["near_tie"] is False
    assert not (d / "parity.json").exists() or json.loads((d / "parity.json").read_text())["passed"]


def test_against_mlx_dir_without_probes(zoo, export_with_probes, tmp_path):
    d = tmp_path / "noprobes"
    shutil.copytree(export_with_probes, d, ignore=shutil.ignore_patterns("probes.safetensors", "parity.json"))
    with pytest.raises(BridgeError, match="no probes.safetensors"):
        verify(d)
    report = verify(d, against=zoo.mlx("llama"), max_new_tokens=4)
    assert report["passed"] and report["reference"]["source"] == "mlx-lm"
    assert report["greedy"]["max_new_tokens"] == 4


def test_checkpoint_export_against_the_checkpoint(zoo, tmp_path):
    """A LoRA checkpoint exported (fused): its probes pass, and so does a fresh MLX run of base + adapter."""
    from mlx_bridge import export

    base = zoo.mlx("llama")
    ad = zoo.adapter(base, "lora-qv", rank=4, keys=["self_attn.q_proj", "self_attn.v_proj"])
    ckpt = make_checkpoint(ad, tmp_path / "ckpt", base)
    out = export(ckpt, tmp_path / "deploy", log=lambda *a: None, progress=False, verify=False)
    assert (out / "probes.safetensors").exists()
    assert verify(out)["passed"]
    report = verify(out, against=ckpt)
    assert report["passed"], report["summary"]
    assert report["greedy"]["max_new_tokens"] == 16  # the checkpoint's probes have none: made here


def test_half_precision_allows_a_few_flipped_positions():
    """A flipped near-tie (e.g. a MoE router) moves one position as a whole: tolerated in half precision only."""
    ref = np.random.default_rng(0).normal(size=(4, 25, 50)).astype(np.float32)
    got = ref + 1e-4
    got[2, 7] += 1.0  # one position of 100 off
    strict = compare_logits(ref, got, *tolerance("float32"))
    assert not strict["passed"] and strict["positions_over_limit"] == 1
    half = compare_logits(ref, got, *tolerance("bfloat16"), outliers=0.02)
    assert half["passed"] and half["allowed_over_limit"] == 2
    got[0, :3] += 1.0  # four positions off: too many
    assert not compare_logits(ref, got, *tolerance("bfloat16"), outliers=0.02)["passed"]
