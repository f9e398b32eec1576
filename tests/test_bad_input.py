"""Issue 13: hostile and damaged input to export, load/generate and verify -- refused before anything is
written or allocated, with one short `error:` line naming the file and field, exit 2, no traceback.

Each case edits a writable copy of a tiny model (MLX layout for export, the export's HF layout for
generate) and runs the command; cases that hang or exhaust memory on a naive implementation (a FIFO as
a weights file, a billion layers) run in a child process with a timeout and an address-space limit."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.cli import main as cli
from mlx_bridge.errors import BridgeError
from mlx_bridge.formats import load_file, save_file
from test_export_common import zoo  # noqa: F401
from test_export_errors import adapter  # noqa: F401  (a writable copy of a LoRA on the last block)

ROOT = Path(__file__).resolve().parents[1]
ST = "model.safetensors"


@pytest.fixture
def mlx_dir(zoo, tmp_path) -> Path:
    return Path(shutil.copytree(zoo.mlx("llama"), tmp_path / "src"))


@pytest.fixture
def hf_dir(zoo, tmp_path) -> Path:
    """An export of the tiny llama (what generate/verify are given)."""
    out = tmp_path / "export"
    assert cli(["export", str(zoo.mlx("llama")), "--out", str(out), "--no-verify", "--no-progress"]) == 0
    return out


def refused(capsys, argv, *names, where: Path | None = None, code: int = 2) -> str:
    before = sorted(os.listdir(where)) if where else None
    rc = cli([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = [l for l in cap.err.strip().splitlines() if not l.startswith(("note:", "warning:"))]
    assert rc == code, f"exit {rc}: {cap.err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {cap.err!r}"
    assert len(lines[0]) <= 530, f"{len(lines[0])} characters"  # error: + 500 + "... (--debug shows all)"
    for n in names:
        assert n in lines[0], f"{lines[0]!r} does not name {n}"
    if where is not None:
        assert sorted(os.listdir(where)) == before, f"left behind: {set(os.listdir(where)) - set(before)}"
    return lines[0]


def export_refused(capsys, src: Path, tmp_path: Path, *names, extra=()) -> str:
    w = tmp_path / "w"
    w.mkdir(exist_ok=True)
    return refused(capsys, ["export", src, "--out", w / "out", "--no-verify", *extra], *names, where=w)


def generate_refused(capsys, d: Path, *names) -> str:
    return refused(capsys, ["generate", d, "--prompt", "hi", "--max-tokens", "2"], *names)


def edit_config(d: Path, **kv) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d: Path, edit, name: str = ST) -> None:
    w = load_file(d / name)
    edit(w)
    save_file(w, d / name, {"format": "pt"})


def child(script: str, limit_gb: int = 6, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run python code in a child with an address-space limit (a runaway allocation fails there, not here)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_gb << 30, limit_gb << 30))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- config values -------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"num_hidden_layers": "4"}, "num_hidden_layers"),
    ({"vocab_size": None}, "vocab_size"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"num_attention_heads": 8, "head_dim": 16}, "q_proj"),
    ({"model_type": ["llama"]}, "model_type"),
]


@pytest.mark.parametrize("edit,name", BAD_CONFIGS, ids=[n + "-" + str(i) for i, (_, n) in enumerate(BAD_CONFIGS)])
def test_export_refuses_bad_config_values(mlx_dir, tmp_path, capsys, edit, name):
    edit_config(mlx_dir, **edit)
    export_refused(capsys, mlx_dir, tmp_path, "config.json", name)


@pytest.mark.parametrize("edit,name", BAD_CONFIGS, ids=[n + "-" + str(i) for i, (_, n) in enumerate(BAD_CONFIGS)])
def test_generate_refuses_bad_config_values(hf_dir, capsys, edit, name):
    edit_config(hf_dir, **edit)
    generate_refused(capsys, hf_dir, "config.json", name)


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_billion_layers_is_refused_before_allocating(mlx_dir, hf_dir, tmp_path, command):
    d = mlx_dir if command == "export" else hf_dir
    edit_config(d, num_hidden_layers=1_000_000_000)
    argv = (["export", str(d), "--out", str(tmp_path / "o"), "--no-verify"] if command == "export" else
            ["generate", str(d), "--prompt", "hi"])
    r = child(f"import sys; from mlx_bridge.cli import main; sys.exit(main({argv!r}))")
    assert r.returncode == 2 and "num_hidden_layers=1000000000" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_q_proj_of_the_wrong_shape_for_the_config(mlx_dir, tmp_path, capsys):
    edit_weights(mlx_dir, lambda w: w.update({"model.layers.1.self_attn.q_proj.weight":
                                              np.zeros((48, 64), np.float32)}))
    export_refused(capsys, mlx_dir, tmp_path, "model.layers.1.self_attn.q_proj.weight")


# --- weights: NaN/Inf ----------------------------------------------------------------------------------------

def test_nan_in_base_weights(mlx_dir, tmp_path, capsys):
    def edit(w):
        w["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    edit_weights(mlx_dir, edit)
    export_refused(capsys, mlx_dir, tmp_path, "model.layers.0.mlp.up_proj.weight", "NaN")


def test_inf_in_base_weights_with_a_dtype_cast(mlx_dir, tmp_path, capsys):
    def edit(w):
        w["model.norm.weight"][0] = np.inf
    edit_weights(mlx_dir, edit)
    export_refused(capsys, mlx_dir, tmp_path, "model.norm.weight", "NaN or Inf", extra=["--dtype", "bfloat16"])


def test_nan_in_adapter_weights(adapter, tmp_path, capsys):
    k = "model.layers.1.self_attn.v_proj.lora_b"
    edit_weights(adapter, lambda w: w[k].__setitem__((0, 0), np.nan), "adapters.safetensors")
    export_refused(capsys, adapter, tmp_path, "adapters.safetensors", k)


def test_adapter_scale_nan(adapter, tmp_path, capsys):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] = float("nan")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    export_refused(capsys, adapter, tmp_path, "adapter_config.json", "scale")


def test_lora_b_that_overflows_float16(adapter, tmp_path, capsys):
    k = "model.layers.1.self_attn.q_proj.lora_b"
    edit_weights(adapter, lambda w: w.update({k: np.full_like(w[k], 1e7)}), "adapters.safetensors")
    export_refused(capsys, adapter, tmp_path, "model.layers.1.self_attn.q_proj.weight", "Inf", extra=["--dtype", "float16"])


@pytest.mark.parametrize("edit,field", [({"lora_parameters": {"rank": "2", "scale": 20.0}}, "rank"),
                                        ({"lora_parameters": [1, 2]}, "lora_parameters"),
                                        ({"fine_tune_type": 3}, "fine_tune_type"),
                                        ({"num_layers": "all"}, "num_layers")])
def test_adapter_config_with_wrong_types(adapter, tmp_path, capsys, edit, field):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(edit)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    export_refused(capsys, adapter, tmp_path, "adapter_config.json", field)


# --- files: not regular, escaping, hostile headers -----------------------------------------------------------

def nested_header(depth: int) -> bytes:
    blob = b"[" * depth + b"]" * depth
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


@pytest.mark.parametrize("kind", ["directory", "nested"])
def test_weights_file_that_is_not_a_safetensors_file(mlx_dir, hf_dir, tmp_path, capsys, kind):
    for d in (mlx_dir, hf_dir):
        (d / ST).unlink()
        if kind == "directory":
            (d / ST).mkdir()
        else:
            (d / ST).write_bytes(nested_header(100_000))
    want = "not a regular file" if kind == "directory" else "nested too deeply"
    export_refused(capsys, mlx_dir, tmp_path, ST, want)
    generate_refused(capsys, hf_dir, ST, want)


@pytest.mark.parametrize("command", ["export", "generate"])
def test_fifo_as_weights_file_does_not_hang(mlx_dir, hf_dir, tmp_path, command):
    d = mlx_dir if command == "export" else hf_dir
    (d / ST).unlink()
    os.mkfifo(d / ST)
    argv = (["export", str(d), "--out", str(tmp_path / "o"), "--no-verify"] if command == "export" else
            ["generate", str(d), "--prompt", "hi"])
    try:
        r = child(f"import sys; from mlx_bridge.cli import main; sys.exit(main({argv!r}))", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("hangs on a FIFO")
    assert r.returncode == 2 and "not a regular file (a FIFO)" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd"])
def test_index_pointing_outside_the_model_dir(mlx_dir, hf_dir, tmp_path, capsys, target):
    shutil.copy(mlx_dir / ST, tmp_path / "outside.safetensors")
    for d in (mlx_dir, hf_dir):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["model.norm.weight"] = target
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    export_refused(capsys, mlx_dir, tmp_path, "model.safetensors.index.json", target)
    generate_refused(capsys, hf_dir, "model.safetensors.index.json", target)


# --- damaged exports: load / generate / verify ---------------------------------------------------------------

def damage(d: Path, how: str) -> None:
    if how == "truncated":
        raw = (d / ST).read_bytes()
        (d / ST).write_bytes(raw[: len(raw) // 2])
    elif how == "header":
        raw = (d / ST).read_bytes()
        (d / ST).write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif how == "config":
        (d / "config.json").write_text('{"model_type": "llama", ')
    elif how == "tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    elif how == "index":
        (d / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    elif how == "missing-shard":
        (d / ST).unlink()


DAMAGE = ["truncated", "header", "config", "tokenizer", "index", "missing-shard"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_damaged_export_is_one_line(hf_dir, capsys, how, command):
    damage(hf_dir, how)
    argv = ["generate", hf_dir, "--prompt", "hi", "--max-tokens", "2"] if command == "generate" else ["verify", hf_dir]
    refused(capsys, argv)


# --- the command line itself ---------------------------------------------------------------------------------

def test_dry_run_into_a_closed_pipe(mlx_dir):
    """`mlx-bridge export ... --dry-run | head -1`: no BrokenPipe traceback."""
    for reader, lines in (("head -1", 1), ("true", 0)):  # `true` closes the pipe before the first line
        cmd = f"{sys.executable} -m mlx_bridge export {mlx_dir} --out {mlx_dir.parent / 'o'} --dry-run | {reader}"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.stdout.count("\n") == lines and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_many_problems_make_a_short_line_and_debug_lists_them(adapter, zoo, tmp_path, capsys):
    """An adapter for another base: how many problems and the first few; --debug lists every one."""
    w = load_file(adapter / "adapters.safetensors")
    for i in range(2, 40):
        for leaf in ("lora_a", "lora_b"):
            w[f"model.layers.{i}.self_attn.q_proj.{leaf}"] = w[f"model.layers.1.self_attn.q_proj.{leaf}"]
    save_file(w, adapter / "adapters.safetensors")
    line = export_refused(capsys, adapter, tmp_path, "38 problems", "... 35 more", "--debug")
    assert line.count("model.layers.") <= 6, line
    with pytest.raises(BridgeError):  # --debug: the traceback, after every problem on its own line
        cli(["--debug", "export", str(adapter), "--out", str(tmp_path / "o2"), "--no-verify"])
    err = capsys.readouterr().err
    assert all(f"model.layers.{i}.self_attn.q_proj" in err for i in range(2, 40)), err[:500]


def test_missing_extra_is_one_line(tmp_path):
    """`generate --help` without torch: one line naming the extra to install."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'mlx'):\n            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, B())\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}:{ROOT}"}
    for argv in (["generate", "--help"], ["train", "--model", "x", "--data", "y", "--out", str(tmp_path / "t")],
                 ["demo", "--quick", "--out", str(tmp_path / "d")]):
        r = subprocess.run([sys.executable, "-m", "mlx_bridge", *argv], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert r.stderr.startswith("error: ") and "pip install 'mlx-bridge[" in r.stderr, r.stderr


def test_debug_shows_the_cause_chain(mlx_dir, tmp_path):
    """--debug: the traceback with the cause (`raise ... from e`); without it one line."""
    (mlx_dir / "config.json").write_text("{not json")
    argv = [sys.executable, "-m", "mlx_bridge", "export", str(mlx_dir), "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1, quiet.stderr
    loud = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, env=env, timeout=120)
    assert "JSONDecodeError" in loud.stderr and "direct cause" in loud.stderr, loud.stderr[-1500:]


@pytest.mark.parametrize("entry", [{"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": {"a": 1}},
                                   [1, 2, 3]])
def test_hostile_header_entries(mlx_dir, tmp_path, capsys, entry):
    blob = json.dumps({"x": entry}).encode()
    blob += b" " * (-len(blob) % 8)
    (mlx_dir / ST).write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    export_refused(capsys, mlx_dir, tmp_path, ST, "'x'")
