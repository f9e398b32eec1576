"""The numpy-only safetensors I/O and dtype table, checked against the `safetensors` package (the reference)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from mlx_bridge.errors import BridgeError
from mlx_bridge.formats import DTYPES, SafetensorsFile, StreamWriter, TensorSpec, load_file, read_header, save_file

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file as torch_save  # noqa: E402

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
         "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
         "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
         "U8": torch.uint8, "BOOL": torch.bool}


def sample(st: str, shape=(3, 5), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = DTYPES[st]
    if st == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if d.floating:
        return rng.standard_normal(shape).astype(np.float32).astype(d.np)
    info = np.iinfo(d.np)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(d.np)


def torch_bytes(t) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()


def test_dtype_table_matches_torch():
    assert set(DTYPES) == set(TORCH)
    for st, d in DTYPES.items():
        assert d.itemsize == torch.tensor([], dtype=TORCH[st]).element_size(), st
        assert d.name == str(TORCH[st]).removeprefix("torch."), st


def test_our_files_read_by_safetensors(tmp_path):
    p = tmp_path / "ours.safetensors"
    tensors = {f"t.{st}": sample(st, seed=i) for i, st in enumerate(DTYPES)}
    tensors["scalar"] = np.array(3.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), ml_dtypes.bfloat16)
    save_file(tensors, p, metadata={"format": "pt", "note": "x"})
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            t = f.get_tensor(k)
            assert tuple(t.shape) == v.shape and torch_bytes(t) == v.tobytes(), k
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0, "data region not 8-byte aligned"


def test_safetensors_files_read_by_us(tmp_path):
    p = tmp_path / "theirs.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{st}": (torch.randn(4, 6, generator=g) * 50).abs().to(TORCH[st]) for st in DTYPES}
    torch_save(tensors, str(p), metadata={"format": "pt"})
    with SafetensorsFile(p) as f:
        assert f.metadata == {"format": "pt"}
        for k, t in tensors.items():
            assert f.info(k).shape == tuple(t.shape)
            assert bytes(f.raw(k)) == torch_bytes(t) == f.get(k).tobytes(), k
    assert load_file(p)["t.BF16"].dtype == ml_dtypes.bfloat16


def test_get_is_zero_copy_and_read_only(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, p)
    with SafetensorsFile(p) as f:
        a = f.get("a")
        assert not a.flags.writeable and a.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_stream_writer_checks_order_dtype_shape_and_completeness(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "BF16", (3,))]
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        with StreamWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("b", np.zeros(3, ml_dtypes.bfloat16))
    with pytest.raises(RuntimeError, match="planned"):
        with StreamWriter(tmp_path / "y.safetensors", specs) as w:
            w.write("a", np.zeros(3, np.float32))
    w = StreamWriter(tmp_path / "z.safetensors", specs)
    w.write("a", np.ones(2, np.float32))
    with pytest.raises(RuntimeError, match="closed before writing"):
        w.close()
    with StreamWriter(tmp_path / "ok.safetensors", specs, {"format": "pt"}) as w:
        w.write("a", np.ones(2, np.float32))
        w.write("b", np.full(3, 1.5, ml_dtypes.bfloat16).view(np.uint8).data)  # raw bytes are accepted
    assert load_file(tmp_path / "ok.safetensors")["b"].astype(np.float32).tolist() == [1.5, 1.5, 1.5]


# --- validation: one error naming the file and the key ------------------------------------------------------

def _file(tmp_path, header: dict, data: bytes, blob: bytes | None = None):
    p = tmp_path / "bad.safetensors"
    blob = blob if blob is not None else json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return p


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


def _with(**changes) -> dict:
    h = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        h[k].update(v)
    return h


@pytest.mark.parametrize("case,header,data,words", [
    ("offsets past the end", _with(b={"data_offsets": [16, 32]}), bytes(24), ["'b'", "out of range"]),
    ("data cut short", GOOD, bytes(20), ["'b'", "out of range"]),
    ("overlap", _with(b={"data_offsets": [8, 16]}), bytes(24), ["'a'", "'b'", "overlap"]),
    ("dtype x shape", _with(a={"dtype": "F16"}), bytes(24), ["'a'", "F16"]),
    ("unknown dtype", _with(a={"dtype": "Q4"}), bytes(24), ["'a'", "Q4"]),
    ("bad shape", _with(a={"shape": [2, -2]}), bytes(24), ["'a'", "shape"]),
    ("missing field", {"a": {"dtype": "F32", "shape": [4]}}, bytes(16), ["'a'", "data_offsets"]),
    ("metadata not strings", dict(GOOD, __metadata__={"n": 1}), bytes(24), ["__metadata__"]),
], ids=lambda x: x if isinstance(x, str) and " " in x else "")
def test_header_validation(tmp_path, case, header, data, words):
    p = _file(tmp_path, header, data)
    with pytest.raises(BridgeError) as e:
        read_header(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    for w in words:
        assert w in msg, f"{case}: {msg!r} lacks {w!r}"


def test_header_length_past_the_end(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(BridgeError, match="header length"):
        read_header(p)
    p.write_bytes(b"abc")
    with pytest.raises(BridgeError, match="not a safetensors file"):
        SafetensorsFile(p)


def test_header_not_json(tmp_path):
    p = _file(tmp_path, {}, bytes(8), blob=b"{nope: 1}")
    with pytest.raises(BridgeError, match="not valid JSON"):
        read_header(p)
