"""How files are hashed (`mlx_bridge/hashing.py`): new manifests record blake3, manifests of earlier
versions (schema 1: bare sha256 hex) are still checked byte for byte in sha256, and a hash this version
cannot check is one line, exit 2. The checkpoint- and export-level tests: test_export_safety.py and
test_train_safety.py (`old_style` below makes their checkpoints' manifests schema 1)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import blake3
import pytest

from mlx_bridge.errors import BridgeError
from mlx_bridge.hashing import StreamHasher, algorithm, algorithm_of, check_hashes, hash_file
from mlx_bridge.manifest import SCHEMA_VERSION, Manifest


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def old_style(d: Path) -> dict:
    """Rewrite `d/manifest.json` as mlx-bridge wrote it before blake3 (main 8af6177, schema 1): bare
    sha256 hex under `files`, `base_model.weight_sha256` and `export.source_sha256` / `export.files`."""
    m = json.loads((d / "manifest.json").read_text())
    base = Path(m["base_model"]["path"]) if m["base_model"].get("path") else None
    m["schema_version"] = 1
    m["files"] = {n: sha256(d / n) for n in m["files"]}
    if "weight_hashes" in m["base_model"]:
        m["base_model"]["weight_sha256"] = {n: sha256(base / n) for n in m["base_model"].pop("weight_hashes")}
    if "source_hashes" in m["export"]:
        m["export"]["source_sha256"] = {n: v.split(":")[1] for n, v in m["export"].pop("source_hashes").items()}
        m["export"]["files"] = dict(m["files"])
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return m


def flip_one_byte(p: Path, at: int = -1) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 1
    p.write_bytes(bytes(b))


def test_a_recorded_hash_names_its_algorithm():
    assert algorithm("blake3:" + "0" * 64, "m") == "blake3" and algorithm("sha256:ab", "m") == "sha256"
    with pytest.raises(BridgeError, match=r"^m\[x\]: unknown hash algorithm 'md5' \(this mlx-bridge knows blake3, sha256\)"):
        algorithm("md5:" + "0" * 32, "m[x]")
    for bad in ("0" * 64, "blake3:", "blake3:XYZ", 3, None):  # bare hex is schema 1's: migrated on read, never here
        with pytest.raises(BridgeError, match="is not a recorded hash"):
            algorithm(bad, "m")
    with pytest.raises(BridgeError, match="mixes hash algorithms"):
        algorithm_of({"a": "blake3:00", "b": "sha256:00"}, "m")
    assert algorithm_of({}, "m") == "blake3"


def test_file_hashes_are_the_libraries_own(tmp_path):
    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert hash_file(p) == "blake3:" + blake3.blake3(data).hexdigest()
    assert hash_file(p, "sha256", chunk=4096) == "sha256:" + hashlib.sha256(data).hexdigest()
    stop = threading.Event()
    stop.set()
    assert hash_file(p, stop=stop) is None
    h = StreamHasher()
    for i in range(0, len(data), 70000):
        h.update("x", data[i: i + 70000])
    assert h.digests() == {"x": hash_file(p)}
    h.close()


def test_check_hashes_uses_the_algorithm_each_value_names(tmp_path):
    (tmp_path / "a").write_bytes(b"aaa")
    (tmp_path / "b").write_bytes(b"bbb")
    files = {"a": hash_file(tmp_path / "a", "sha256"), "b": hash_file(tmp_path / "b")}
    assert check_hashes(tmp_path, files) == files
    flip_one_byte(tmp_path / "a")
    with pytest.raises(BridgeError, match=r"a: changed since it was saved \(sha256 differs from manifest.json\)"):
        check_hashes(tmp_path, files)


def test_a_schema_1_manifest_is_read_as_sha256(tmp_path):
    """A manifest as the earlier versions wrote it: its keys renamed, its hex tagged sha256, nothing else
    changed; its files check in sha256."""
    (tmp_path / "adapters.safetensors").write_bytes(b"x" * 100)
    hexd = sha256(tmp_path / "adapters.safetensors")
    d = {"schema_version": 1, "kind": "checkpoint", "files": {"adapters.safetensors": hexd},
         "base_model": {"path": "b", "weight_sha256": {"model.safetensors": "ab" * 32}},
         "dataset": {"sha256": "cd" * 32}, "export": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    m = Manifest.load(tmp_path)
    assert m.schema_version == SCHEMA_VERSION == 2
    assert m.files == {"adapters.safetensors": "sha256:" + hexd}
    assert m.base_model == {"path": "b", "weight_hashes": {"model.safetensors": "sha256:" + "ab" * 32}}
    assert m.dataset == {"sha256": "cd" * 32}  # a data fingerprint, not a file hash: as it was
    check_hashes(tmp_path, m.files)


@pytest.mark.parametrize("value", ["md5:" + "0" * 32, "blake3", 7])
def test_a_manifest_with_a_hash_it_cannot_check_is_refused_on_load(tmp_path, value):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": "checkpoint",
                                                        "files": {"adapters.safetensors": value}}))
    with pytest.raises(BridgeError) as e:
        Manifest.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'manifest.json'}: files['adapters.safetensors']: "), msg
