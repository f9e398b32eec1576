"""Issue 13, the training side: resume refuses what it cannot trust (missing, changed or damaged
checkpoint files: one line, exit 2, never a silent fresh start), a save stopped between its renames is
recovered, --out never replaces the base, a base's own tokenizer code is never run, and a config
that claims a billion layers is refused before mlx-lm builds them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_bridge.cli import main as cli
from mlx_bridge.errors import BridgeError
from mlx_bridge.fsutil import side_name
from mlx_bridge.hashing import hash_file
from mlx_bridge.manifest import Manifest
from mlx_bridge.train.trainer import MLXTrainer
from test_bad_input import child
from test_hashing import flip_one_byte, old_style
from test_train_trainer import FAST, bases, data, datasets  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(bases, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "ck"
    MLXTrainer(str(bases["f32"]), str(data), out=out, lora_rank=2, **FAST).train(iters=2)
    return out


@pytest.fixture
def ckpt(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "ck"))


def resume(capsys, bases, data, out: Path, *extra) -> tuple[int, str]:
    rc = cli(["train", "--model", str(bases["f32"]), "--data", str(data), "--out", str(out), "--resume",
              "--iters", "3", "--lora-rank", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet", *extra])
    return rc, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if not l.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_without_a_checkpoint_is_an_error(bases, data, tmp_path, capsys, where):
    out = tmp_path / "ck"
    if where == "empty":
        out.mkdir()
    rc, err = resume(capsys, bases, data, out)
    assert rc == 2 and "no checkpoint to resume" in one_error(err)
    assert not out.exists() or not any(out.iterdir())


def rehash(d: Path) -> None:
    """Record the files' current hashes (a checkpoint whose manifest agrees with its damage)."""
    m = Manifest.load(d)
    m.files = {n: hash_file(d / n) for n in m.files if (d / n).is_file()}
    m.save(d)


def damage(d: Path, how: str) -> str:
    """Damage one file of a checkpoint; returns the file name the error must name."""
    st = json.loads((d / "trainer_state.json").read_text())
    if how == "state-not-json":
        (d / "trainer_state.json").write_text("{step: 2")
        return "trainer_state.json"
    if how in ("state-missing-key", "state-wrong-type"):
        st.pop("position") if how == "state-missing-key" else st.update(step="2")
        (d / "trainer_state.json").write_text(json.dumps(st))
        return "trainer_state.json"
    if how in ("adapters-truncated", "optimizer-truncated"):
        f = d / ("adapters.safetensors" if how == "adapters-truncated" else "optimizer.safetensors")
        f.write_bytes(f.read_bytes()[:100])
        return f.name
    if how == "log-damaged":
        (d / "training_log.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
        return "training_log.jsonl"
    if how == "adapters-directory":
        (d / "adapters.safetensors").unlink()
        (d / "adapters.safetensors").mkdir()
        return "adapters.safetensors"
    raise ValueError(how)


DAMAGE = ["state-not-json", "state-missing-key", "state-wrong-type", "adapters-truncated", "optimizer-truncated",
          "log-damaged", "adapters-directory"]


@pytest.mark.parametrize("rehashed", [False, True], ids=["hash-check", "file-check"])
@pytest.mark.parametrize("how", DAMAGE)
def test_resume_on_damaged_state_is_one_line(bases, data, ckpt, capsys, how, rehashed):
    name = damage(ckpt, how)
    if rehashed:
        if how == "adapters-directory":
            pytest.skip("a directory has no hash to record")
        rehash(ckpt)
    rc, err = resume(capsys, bases, data, ckpt)
    line = one_error(err)
    assert rc == 2 and name in line, line


def test_resume_from_a_changed_adapter_is_refused(bases, data, ckpt, capsys):
    from mlx_bridge.formats import load_file, save_file

    w = load_file(ckpt / "adapters.safetensors")
    k = next(iter(w))
    w[k] = w[k] * 2
    save_file(w, ckpt / "adapters.safetensors")
    rc, err = resume(capsys, bases, data, ckpt)
    line = one_error(err)
    assert rc == 2 and "adapters.safetensors" in line and "blake3 differs" in line, line


@pytest.mark.parametrize("change", [None, "adapters.safetensors", "optimizer.safetensors"])
def test_resume_checks_a_checkpoint_of_an_earlier_version_in_sha256(bases, data, ckpt, capsys, change):
    """A checkpoint whose manifest an earlier version wrote (schema 1, sha256 of its files and its base):
    resumed when the bytes are the ones it records (and saved again in blake3), refused when one byte
    changed."""
    old_style(ckpt)
    if change:
        flip_one_byte(ckpt / change, at=len((ckpt / change).read_bytes()) // 2)
    rc, err = resume(capsys, bases, data, ckpt)
    if change is None:
        m = Manifest.load(ckpt)
        assert rc == 0 and m.training["steps"] == 3, err
        assert {v.split(":")[0] for v in [*m.files.values(), *m.base_model["weight_hashes"].values()]} == {"blake3"}
        return
    line = one_error(err)
    assert rc == 2 and f"{change}: changed since it was saved (sha256 differs" in line, line


def test_resume_refuses_a_base_whose_bytes_differ_from_an_old_manifest(bases, data, ckpt, capsys):
    m = old_style(ckpt)
    m["base_model"]["weight_sha256"]["model.safetensors"] = "0" * 64  # the base it names had other bytes
    (ckpt / "manifest.json").write_text(json.dumps(m))
    rc, err = resume(capsys, bases, data, ckpt)
    assert rc == 2 and "base model weights differ from the checkpoint's base" in one_error(err), err


def test_a_save_stopped_between_its_renames_is_recovered_on_resume(bases, data, ckpt, capsys):
    """kill -9 after the old checkpoint was moved aside: the next --resume puts it back and says so."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    os.rename(ckpt, side_name(ckpt, "old", p.pid))
    rc, err = resume(capsys, bases, data, ckpt)
    assert rc == 0 and "recovered" in err, err
    assert Manifest.load(ckpt).training["steps"] == 3
    assert sorted(os.listdir(ckpt.parent)) == ["ck"]


def test_train_out_equal_to_the_base_is_refused(bases, data, tmp_path, capsys):
    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    rc = cli(["train", "--model", str(base), "--data", str(data), "--out", str(base), "--force", "--iters", "1",
              "--quiet"])
    assert rc == 2 and "base model" in one_error(capsys.readouterr().err)
    assert (base / "model.safetensors").is_file() and (base / "config.json").is_file()


def test_tokenizer_code_of_a_base_is_never_run(bases, tmp_path, monkeypatch):
    """auto_map in tokenizer_config.json: transformers would ask "run the custom code? [y/N]"; never asked."""
    from mlx_bridge.train.model import load_base

    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc.pop("tokenizer_class", None)
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    marker = tmp_path / "ran"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who answers yes
    with pytest.raises(BridgeError, match="tokenizer"):
        load_base(str(base))
    assert not marker.exists(), "the base's code ran"


def test_a_billion_layers_is_refused_before_mlx_builds_them(bases, tmp_path):
    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 1_000_000_000
    (base / "config.json").write_text(json.dumps(cfg))
    r = child(f"from mlx_bridge.train.model import load_base\nload_base({str(base)!r})", timeout=120)
    assert "num_hidden_layers=1000000000" in r.stderr and "BridgeError" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("where", ["train", "export"])
def test_hub_downloads_fetch_no_code(monkeypatch, tmp_path, where):
    """A hub id is fetched without *.py (mlx-lm's own pattern list allows it)."""
    import huggingface_hub

    seen = {}

    def fake(repo, revision=None, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(BridgeError):
        if where == "train":
            from mlx_bridge.train.model import load_base

            load_base("someone/some-model")
        else:
            from mlx_bridge.translate.source import resolve_model

            resolve_model("someone/some-model", "adapter_config.json")
    assert seen["patterns"] and not any(p.endswith(".py") or p == "*" for p in seen["patterns"]), seen


@pytest.mark.parametrize("edit,field", [({"num_hidden_layers": "4"}, "num_hidden_layers"),
                                        ({"model_type": ["llama"]}, "model_type"),
                                        ({"vocab_size": None}, "vocab_size")])
def test_train_refuses_bad_config_values(bases, data, tmp_path, capsys, edit, field):
    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(edit)
    (base / "config.json").write_text(json.dumps(cfg))
    rc = cli(["train", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--iters", "1",
              "--quiet"])
    line = one_error(capsys.readouterr().err)
    assert rc == 2 and "config.json" in line and field in line, line
    assert not (tmp_path / "o").exists()
