"""Issue 2, bad input: exit code 2, one line on stderr starting `error: ` that names the file and the key,
and nothing written (no output dir, no temporary dir beside it)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.cli import main as cli
from mlx_bridge.formats import load_file, save_file
from test_export_common import zoo  # noqa: F401

ST = "model.safetensors"


def refused(capsys, tmp_path: Path, src: Path, *names, extra=(), out: Path | None = None) -> str:
    """Run `mlx-bridge export src --out ...`; check exit 2, one `error:` line naming each of `names`
    (a tuple = any one of them), and that nothing was written. Returns the line."""
    where = tmp_path / "w"
    where.mkdir(exist_ok=True)
    before = sorted(os.listdir(where))
    out = out or where / "out"
    rc = cli(["export", str(src), "--out", str(out), *map(str, extra)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr {cap.err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {cap.err!r}"
    for n in names:
        alts = n if isinstance(n, tuple) else (n,)
        assert any(a in lines[0] for a in alts), f"{lines[0]!r} does not name {' or '.join(alts)}"
    print(lines[0])
    assert sorted(os.listdir(where)) == before, f"left behind: {sorted(set(os.listdir(where)) - set(before))}"
    return lines[0]


@pytest.fixture
def src(zoo, tmp_path) -> Path:
    """A writable copy of the tiny float32 llama."""
    return Path(shutil.copytree(zoo.mlx("llama"), tmp_path / "src"))


def read_st(p: Path) -> tuple[dict, bytes]:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(p: Path, header: dict, data: bytes, blob: bytes | None = None) -> None:
    blob = blob if blob is not None else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


# --- corrupted safetensors ---------------------------------------------------------------------------------

def test_header_length_past_the_end(src, tmp_path, capsys):
    (src / ST).write_bytes(struct.pack("<Q", 10**6) + b'{"a":')
    refused(capsys, tmp_path, src, ST)


def test_data_cut_short(src, tmp_path, capsys):
    header, data = read_st(src / ST)
    write_st(src / ST, header, data[:-100])
    refused(capsys, tmp_path, src, ST, last_tensor(header))


def test_offsets_out_of_range(src, tmp_path, capsys):
    header, data = read_st(src / ST)
    k = "model.layers.0.self_attn.o_proj.weight"
    b, e = header[k]["data_offsets"]
    header[k]["data_offsets"] = [b + len(data), e + len(data)]  # right size, past the end
    write_st(src / ST, header, data)
    refused(capsys, tmp_path, src, ST, k)


def test_overlapping_tensors(src, tmp_path, capsys):
    header, data = read_st(src / ST)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    write_st(src / ST, header, data)
    refused(capsys, tmp_path, src, ST, (a, b))


def test_dtype_shape_not_matching_byte_count(src, tmp_path, capsys):
    header, data = read_st(src / ST)
    header["model.norm.weight"]["dtype"] = "F16"  # 64 x 2 bytes, offsets span 64 x 4
    write_st(src / ST, header, data)
    refused(capsys, tmp_path, src, ST, "model.norm.weight")


def test_header_not_json(src, tmp_path, capsys):
    header, data = read_st(src / ST)
    n = len(json.dumps(header).encode())
    write_st(src / ST, header, data, blob=b"{not json" + b"#" * (n - 9))
    refused(capsys, tmp_path, src, ST, "JSON")


def test_shard_listed_in_index_is_missing(src, tmp_path, capsys):
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    refused(capsys, tmp_path, src, "model-00002-of-00002.safetensors")


# --- config ------------------------------------------------------------------------------------------------

def test_missing_config(src, tmp_path, capsys):
    (src / "config.json").unlink()
    refused(capsys, tmp_path, src, "config.json")


def test_config_contradicts_weights(src, tmp_path, capsys):
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    refused(capsys, tmp_path, src, "config.json", ("hidden_size", "model.embed_tokens.weight", "model.norm.weight",
                                                   "self_attn.q_proj.weight"))


def test_config_says_more_layers_than_the_weights_have(src, tmp_path, capsys):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    refused(capsys, tmp_path, src, ("num_hidden_layers", "model.layers.2."))


def test_unknown_model_type_points_at_the_list(src, tmp_path, capsys):
    """The registry has ~50 types: the line names the type and points at the generated table."""
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (src / "config.json").write_text(json.dumps(cfg))
    line = refused(capsys, tmp_path, src, "frobnicator", "config.json")
    assert "docs/architectures.md" in line and (Path(__file__).parent.parent / "docs/architectures.md").is_file()


def test_quantized_weight_without_biases(zoo, tmp_path, capsys):
    src = Path(shutil.copytree(zoo.mlx("llama", quant=dict(bits=4, group_size=64)), tmp_path / "src"))
    header, data = read_st(src / ST)
    gone = "model.layers.0.mlp.up_proj.biases"
    del header[gone]
    write_st(src / ST, header, data)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    del idx["weight_map"][gone]
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    refused(capsys, tmp_path, src, ("model.layers.0.mlp.up_proj", gone))


# --- adapters ----------------------------------------------------------------------------------------------

@pytest.fixture
def adapter(zoo, tmp_path) -> Path:
    base = zoo.mlx("llama")
    return Path(shutil.copytree(zoo.adapter(base, "lora-qv-last", keys=["self_attn.q_proj", "self_attn.v_proj"],
                                            num_layers=1, rank=2), tmp_path / "ad"))


def test_adapter_key_not_in_base(adapter, tmp_path, capsys):
    w = load_file(adapter / "adapters.safetensors")
    bad = "model.layers.5.self_attn.q_proj.lora_a"  # the base has 2 layers
    w[bad] = w["model.layers.1.self_attn.q_proj.lora_a"]
    w["model.layers.5.self_attn.q_proj.lora_b"] = w["model.layers.1.self_attn.q_proj.lora_b"]
    save_file(w, adapter / "adapters.safetensors")
    refused(capsys, tmp_path, adapter, "adapters.safetensors", "model.layers.5.self_attn.q_proj")


def test_adapter_shape_does_not_fit(adapter, tmp_path, capsys):
    w = load_file(adapter / "adapters.safetensors")
    k = "model.layers.1.self_attn.v_proj.lora_a"
    w[k] = np.zeros((48, w[k].shape[1]), np.float32)  # v_proj takes 64 inputs
    save_file(w, adapter / "adapters.safetensors")
    refused(capsys, tmp_path, adapter, "adapters.safetensors", k)


def test_adapter_base_not_found(adapter, tmp_path, capsys):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["model"] = "/nonexistent/base-model"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    refused(capsys, tmp_path, adapter, "/nonexistent/base-model", ("adapter_config.json", "--base"))


def test_adapter_config_not_json(adapter, tmp_path, capsys):
    (adapter / "adapter_config.json").write_text("{fine_tune_type: lora")
    refused(capsys, tmp_path, adapter, "adapter_config.json")


# --- output directory and dry run --------------------------------------------------------------------------

def test_existing_output_needs_force(zoo, tmp_path, capsys):
    base = zoo.mlx("llama")
    out = tmp_path / "w" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    refused(capsys, tmp_path, base, str(out), "--force", out=out)
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(["export", str(base), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "temporary dirs left beside the output"


def test_dry_run_writes_nothing(adapter, tmp_path, capsys):
    out = tmp_path / "w" / "out"
    out.parent.mkdir()
    assert cli(["export", str(adapter), "--out", str(out), "--dry-run"]) == 0
    assert "model.layers.1.self_attn.q_proj.weight" in capsys.readouterr().out
    assert not list(out.parent.iterdir())


def test_console_script_exit_code(src, tmp_path):
    """The installed `mlx-bridge` entry point: exit code 2 and one stderr line for a truncated file."""
    header, data = read_st(src / ST)
    write_st(src / ST, header, data[: len(data) // 2])
    exe = Path(sys.executable).with_name("mlx-bridge")
    assert exe.exists(), f"{exe}: entry point not installed"
    r = subprocess.run([str(exe), "export", str(src), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ") and ST in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_adapter_base_relative_to_adapter_dir(adapter, tmp_path, monkeypatch):
    """mlx-lm records `model` as given at training time: a relative path is also tried from the adapter's dir."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    shutil.copytree(cfg["model"], tmp_path / "base")
    cfg["model"] = "../base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir("/")  # ../base is not found from the working directory
    assert cli(["export", str(adapter), "--out", str(tmp_path / "o"), "--no-verify"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
