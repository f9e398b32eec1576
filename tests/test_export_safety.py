"""Issue 13: an export never ships what it cannot stand behind, and never destroys what it reads.

A failed parity check exits non-zero with nothing under the output name; the base must be the one the
checkpoint's manifest hashed; changed checkpoint files are refused; --out may not be, contain or sit
inside the source; a second run does not replace a finished output without --force; a run stopped
anywhere (SIGTERM, kill -9, a full disk) leaves the old output or the new one, and no temp dirs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.cli import main as cli
from mlx_bridge.errors import BridgeError
from mlx_bridge.formats import load_file, save_file
from mlx_bridge.fsutil import atomic_dir, recover, run_tag, side_name
from mlx_bridge.hashing import hash_file
from mlx_bridge.manifest import Manifest
from mlx_bridge.testing.adapters import make_checkpoint
from test_export_common import zoo  # noqa: F401
from test_hashing import flip_one_byte, old_style

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def one_line(err: str) -> str:
    lines = err.splitlines()
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def ckpt(zoo, tmp_path) -> Path:
    """A LoRA checkpoint whose manifest records the base's weight hashes and every file's hash, as the
    trainer writes it."""
    base = Path(shutil.copytree(zoo.mlx("llama"), tmp_path / "base"))
    ad = zoo.adapter(zoo.mlx("llama"), "lora-qv", rank=4, keys=["self_attn.q_proj", "self_attn.v_proj"])
    d = make_checkpoint(ad, tmp_path / "ckpt", base)
    m = Manifest.load(d)
    m.base_model["weight_hashes"] = {p.name: hash_file(p) for p in sorted(base.glob("model*.safetensors"))}
    m.files = {p.name: hash_file(p) for p in sorted(d.iterdir()) if p.name != "manifest.json"}
    m.save(d)
    return d


def other_base(ckpt: Path, tmp_path: Path) -> Path:
    """The checkpoint's base with one weight changed (another model of the same shape)."""
    base = Path(Manifest.load(ckpt).base_model["path"])
    other = Path(shutil.copytree(base, tmp_path / "other"))
    w = load_file(other / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 3.0
    save_file(w, other / "model.safetensors", {"format": "pt"})
    return other


def test_checkpoint_export_passes_and_records_parity(ckpt, tmp_path, capsys):
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out")
    assert rc == 0, err
    m = Manifest.load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["passed"]
    assert "parity.json" in m.files and m.export["source_hashes"]


def test_base_with_other_weights_is_refused(ckpt, tmp_path, capsys):
    other = other_base(ckpt, tmp_path)
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out", "--base", other)
    line = one_line(err)
    assert rc == 2 and "model.safetensors" in line and "--allow-base-mismatch" in line, err
    assert not (tmp_path / "out").exists()


def test_failed_parity_exits_1_and_writes_nothing(ckpt, tmp_path, capsys):
    """With the hash check waived, the wrong base fails parity: exit 1, no output, no temp dirs."""
    other = other_base(ckpt, tmp_path)
    where = tmp_path / "w"
    where.mkdir()
    rc, err = run(capsys, "export", ckpt, "--out", where / "out", "--base", other, "--allow-base-mismatch")
    line = one_line(err)
    assert rc == 1 and "FAIL" in line, err
    assert os.listdir(where) == [], os.listdir(where)
    rc, err = run(capsys, "export", ckpt, "--out", where / "out", "--base", other, "--allow-base-mismatch",
                  "--keep-failed")
    assert rc == 1 and sorted(os.listdir(where)) == ["out.failed"], (err, os.listdir(where))
    assert not json.loads((where / "out.failed" / "parity.json").read_text())["passed"]
    assert f"`{other}`" in (where / "out.failed" / "README.md").read_text()  # the base used


def test_nan_logits_fail_parity():
    """NaN weights make NaN logits on both sides: that is a failure, not a match."""
    from mlx_bridge.verify.parity import compare_logits

    ref = np.ones((1, 2, 5), np.float32)
    assert not compare_logits(np.full_like(ref, np.nan), np.full_like(ref, np.nan), 1e-3, 1e-3)["passed"]
    assert not compare_logits(ref, np.where(np.arange(5) == 2, np.inf, ref), 1e-3, 1e-3)["passed"]


def test_changed_adapter_is_refused_on_export(ckpt, tmp_path, capsys):
    w = load_file(ckpt / "adapters.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1.0
    save_file(w, ckpt / "adapters.safetensors")
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and "adapters.safetensors" in line and "blake3 differs" in line, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [None, "adapters.safetensors", "base"])
def test_a_checkpoint_of_an_earlier_version_is_checked_in_sha256(ckpt, tmp_path, capsys, change):
    """A checkpoint whose manifest an earlier version wrote (schema 1, sha256): exported when its bytes and
    its base's are the ones it records (the export's manifest keeps their sha256 and hashes its own files
    in blake3), refused when one byte changed."""
    old_style(ckpt)
    if change == "base":
        flip_one_byte(Path(Manifest.load(ckpt).base_model["path"]) / "model.safetensors")
    elif change:
        flip_one_byte(ckpt / change)
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out")
    if change is None:
        assert rc == 0, err
        m = Manifest.load(tmp_path / "out")
        assert {v.split(":")[0] for v in m.export["source_hashes"].values()} == {"sha256"}
        assert m.base_model["weight_hashes"].items() <= m.export["source_hashes"].items()  # the base, as checked
        assert {v.split(":")[0] for v in m.files.values()} == {"blake3"}
        return
    line = one_line(err)
    assert rc == 2 and not (tmp_path / "out").exists(), err
    assert ("adapters.safetensors: changed since it was saved (sha256 differs" in line if change != "base"
            else "weight files differ from the base the checkpoint was trained on" in line), line


def test_a_hash_this_version_cannot_check_is_one_line(ckpt, tmp_path, capsys):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"]["adapters.safetensors"] = "md5:" + "0" * 32
    (ckpt / "manifest.json").write_text(json.dumps(m))
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and "files['adapters.safetensors']: unknown hash algorithm 'md5'" in line, err
    assert not (tmp_path / "out").exists()


# --- the output directory ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "above", "inside"])
def test_out_overlapping_the_source_is_refused_even_with_force(zoo, tmp_path, capsys, where):
    models = tmp_path / "models"
    src = Path(shutil.copytree(zoo.mlx("llama"), models / "base"))
    out = {"same": src, "above": models, "inside": src / "hf"}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    rc, err = run(capsys, "export", src, "--out", out, "--force", "--no-verify")
    assert rc == 2 and "--out" in one_line(err), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_out_equal_to_the_base_of_a_checkpoint_is_refused(ckpt, capsys):
    base = Manifest.load(ckpt).base_model["path"]
    rc, err = run(capsys, "export", ckpt, "--out", base, "--force", "--no-verify")
    assert rc == 2 and "base model" in one_line(err), err
    assert (Path(base) / "model.safetensors").is_file()


def test_output_filled_meanwhile_is_not_replaced(tmp_path):
    """Two exports to one --out: the one finishing second does not replace the first without --force."""
    out = tmp_path / "out"
    with pytest.raises(BridgeError, match="another run"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()
            (out / "theirs").write_text("first")
    assert os.listdir(out) == ["theirs"] and os.listdir(tmp_path) == ["out"]


def test_full_disk_while_finishing_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing parity.json: exit 1, one line naming the cause, no output under its name."""
    import mlx_bridge.translate.export as ex

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ex, "write_atomic", full)
    where = tmp_path / "w"
    where.mkdir()
    rc, err = run(capsys, "export", ckpt, "--out", where / "out")
    assert rc == 1 and "No space left on device" in one_line(err) and "parity.json" in err, err
    assert os.listdir(where) == []


def test_a_disk_too_small_for_the_shards_is_refused_before_writing(zoo, tmp_path, capsys, monkeypatch):
    """Each shard's size is reserved (fallocate) before its first byte: a full disk is one line naming
    the shard, exit 1, nothing under the output name."""
    import ctypes

    import mlx_bridge.fsutil as fsutil

    asked = []

    def full(fd, mode, offset, nbytes):
        asked.append(nbytes)
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(fsutil, "_fallocate", lambda: full)
    where = tmp_path / "w"
    where.mkdir()
    rc, err = run(capsys, "export", zoo.mlx("llama"), "--out", where / "out", "--no-verify")
    line = one_line(err)
    assert rc == 1 and "No space left on device" in line and "model.safetensors" in line, err
    assert os.listdir(where) == [] and asked and asked[0] > 1000


def test_each_checkpoint_file_is_hashed_once(ckpt, tmp_path, monkeypatch):
    """The manifest check hashes the checkpoint's files; the export's `source_hashes` reuses those hashes
    (the adapter is not read and hashed a second time)."""
    import mlx_bridge.hashing as hashing
    import mlx_bridge.translate.export as ex
    from mlx_bridge import export

    hashed = []
    real = hashing.hash_file

    def counting(p, *a, **k):
        hashed.append(Path(p).name)
        return real(p, *a, **k)

    monkeypatch.setattr(hashing, "hash_file", counting)
    monkeypatch.setattr(ex, "hash_file", counting)
    out = export(ckpt, tmp_path / "out", verify=False, progress=False, log=lambda *a: None)
    assert hashed.count("adapters.safetensors") == 1, hashed
    assert Manifest.load(out).export["source_hashes"]["adapters.safetensors"] == real(ckpt / "adapters.safetensors")


def test_outputs_follow_the_umask(ckpt, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "out")
    finally:
        os.umask(old)
    assert rc == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]}
    assert modes.pop("out") == 0o755 and set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}


# --- crashes -------------------------------------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_kill_between_the_renames_of_force_is_recovered(tmp_path):
    """Stopped after moving the old output aside: the next run puts the complete new one in place."""
    pid = dead_pid()
    new, old = side_name(tmp_path / "out", "new", pid), side_name(tmp_path / "out", "old", pid)
    new.mkdir(), old.mkdir()
    (new / "v").write_text("new")
    (old / "v").write_text("old")
    (tmp_path / f".out.tmp-{run_tag(pid)}-abc").mkdir()  # an incomplete one
    said = recover(tmp_path / "out")
    assert "recovered" in said and (tmp_path / "out" / "v").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]


def test_only_the_old_output_left_is_put_back(tmp_path):
    pid = dead_pid()
    side_name(tmp_path / "out", "old", pid).mkdir()
    (side_name(tmp_path / "out", "old", pid) / "v").write_text("old")
    recover(tmp_path / "out")
    assert (tmp_path / "out" / "v").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_side_dirs_of_a_live_run_are_left_alone(tmp_path):
    live = tmp_path / f".out.tmp-{run_tag(os.getppid())}-abc"
    live.mkdir()
    recover(tmp_path / "out")
    assert live.is_dir()


def test_leftover_temp_dir_of_a_killed_run_is_cleaned_by_the_next(zoo, tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / f".out.tmp-{run_tag(pid)}-xyz").mkdir()
    (tmp_path / f".out.tmp-{run_tag(pid)}-xyz" / "model.safetensors").write_bytes(b"\0" * 1000)
    rc, err = run(capsys, "export", zoo.mlx("llama"), "--out", tmp_path / "out", "--no-verify")
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["out"]


def test_sigterm_cleans_up_like_ctrl_c(zoo, tmp_path):
    """SIGTERM in the middle of writing: exit 143, no output, no temp dir."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time
        import mlx_bridge.translate.export as ex
        def slow(*a, **k):
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        ex.write_weights = slow
        from mlx_bridge.cli import main
        sys.exit(main(["export", {str(zoo.mlx("llama"))!r}, "--out", {str(tmp_path / "w" / "out")!r}, "--no-verify"]))
    """)
    (tmp_path / "w").mkdir()
    p = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if ready.exists() or p.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), p.stderr.read()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "Traceback" not in err and os.listdir(tmp_path / "w") == []


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_shard_hashes_computed_while_writing_are_the_files(zoo, tmp_path, dtype):
    """The hash of each shard is computed from the bytes as they are written (copied expert slices,
    cast and fused tensors, several shards): it must equal a fresh hash of the file."""
    from mlx_bridge import export

    out = export(zoo.mlx("mixtral"), tmp_path / "out", dtype=dtype, shard_size="20KB", verify=False,
                 progress=False, log=lambda *a: None)
    m = Manifest.load(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    assert {p.name: hash_file(p) for p in out.iterdir() if p.name not in ("manifest.json", "README.md")} == m.files


# --- PEFT exports are verified too ---------------------------------------------------------------------------

def test_peft_export_is_verified_and_verify_accepts_a_peft_dir(ckpt, tmp_path, capsys):
    rc, err = run(capsys, "export", ckpt, "--out", tmp_path / "peft", "--format", "peft")
    assert rc == 0, err
    report = json.loads((tmp_path / "peft" / "parity.json").read_text())
    assert report["passed"] and "peft" in report["deployed"], report["summary"]
    assert "parity.json" in Manifest.load(tmp_path / "peft").files
    # a PEFT file with the wrong scale (lora_alpha doubled): `verify DIR` fails, exit 1
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli(["verify", str(tmp_path / "peft"), "--no-write"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_failed_peft_parity_writes_nothing(ckpt, tmp_path, capsys):
    other = other_base(ckpt, tmp_path)
    where = tmp_path / "w"
    where.mkdir()
    rc, err = run(capsys, "export", ckpt, "--out", where / "out", "--format", "peft", "--base", other,
                  "--allow-base-mismatch")
    assert rc == 1 and "FAIL" in one_line(err), err
    assert os.listdir(where) == []


def test_verify_asked_without_probes_is_refused(zoo, tmp_path, capsys):
    rc, err = run(capsys, "export", zoo.mlx("llama"), "--out", tmp_path / "out", "--verify")
    assert rc == 2 and "probes.safetensors" in one_line(err) and not (tmp_path / "out").exists(), err


def test_scratch_dirs_of_dead_runs_are_removed(tmp_path, monkeypatch):
    import tempfile

    from mlx_bridge.fsutil import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"mlx-bridge-peft-{run_tag(dead_pid())}-abc"
    stale.mkdir()
    with scratch_dir("mlx-bridge-peft") as d:
        assert d.is_dir() and not stale.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["lora-emb-head", "dora", "qlora", "lora-qwen3_moe"])
def test_peft_merge_formulas_pass_parity(zoo, tmp_path, case):
    """The PEFT check merges with PEFT's own formulas: embedding LoRA, DoRA, a quantized base and MoE
    experts all pass against the MLX probes of the checkpoint."""
    from mlx_bridge import export
    from test_export_peft import CASES

    arch, quant, kw = CASES[case]
    base = zoo.mlx(arch, quant=quant)
    ckpt = make_checkpoint(zoo.adapter(base, case, **kw), tmp_path / "ckpt", base)
    out = export(ckpt, tmp_path / "peft", format="peft", progress=False, log=lambda *a: None)
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"], report["summary"]
