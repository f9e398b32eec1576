"""Issue 13, export speed: tensors are made, scanned, written and hashed in bounded chunks through
reused buffers. Whatever the chunk size, the shards hold exactly the bytes of the whole-tensor path
(`materialize`), the streamed hash is the file's, and a NaN/Inf anywhere in a tensor (in any chunk)
is refused with the tensor's full count."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlx_bridge.errors import BridgeError
from mlx_bridge.formats import SafetensorsFile, save_file
from mlx_bridge.hashing import StreamHasher, hash_file
from mlx_bridge.translate.chunks import split
from mlx_bridge.translate.execute import write_weights
from mlx_bridge.translate.parts import Item, Lora, Part, Ref, materialize
from mlx_bridge.translate.plan import build_plan
from mlx_bridge.translate.source import open_source
from test_export_common import read_tensors, zoo  # noqa: F401

CASES = {  # name -> (arch, base dtype, quantization, make_adapter kwargs)
    "lora-bf16": ("llama", "bfloat16", None, dict(rank=4, num_layers=2)),
    "lora-emb-head": ("llama", "float32", None, dict(rank=4, keys=["self_attn.q_proj", "self_attn.v_proj", "lm_head",
                                                                    "model.embed_tokens"], num_layers=1)),
    "lora-qwen3_moe": ("qwen3_moe", "float32", None, dict(rank=4)),  # one expert of a stacked weight at a time
    "qlora": ("llama", "float32", dict(bits=4, group_size=64), dict(rank=4)),  # dequantized: the whole path
    "dora": ("qwen2", "float32", None, dict(fine_tune_type="dora", rank=4)),
}
CHUNK, ROWS = 2048, 4  # the tiny models' tensors cut into many chunks, fused 4 rows at a time


@pytest.mark.parametrize("dtype", ["auto", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_shards_hold_the_whole_tensor_bytes(zoo, tmp_path, case, dtype):
    arch, base_dtype, quant, kw = CASES[case]
    base = zoo.mlx(arch, dtype=base_dtype, quant=quant)
    source = open_source(zoo.adapter(base, case, **kw))
    try:
        plan = build_plan(source, dtype)
        hasher = StreamHasher()
        write_weights(plan.items, tmp_path, shard_size=plan.total_bytes // 3, chunk_bytes=CHUNK, lookahead_bytes=3 * CHUNK,
                      progress=False, hasher=hasher, rows=ROWS)
        got = read_tensors(tmp_path)
        assert set(got) == {it.name for it in plan.items}
        for it in plan.items:
            assert got[it.name][2] == np.ascontiguousarray(materialize(it)).tobytes(), f"{it.name}: {it.describe()}"
        shards = sorted(tmp_path.glob("model*.safetensors"))
        assert len(shards) > 1 and hasher.digests() == {p.name: hash_file(p) for p in shards}
        hasher.close()
        fused = [split(it, CHUNK, ROWS) for it in plan.items if any(p.lora for p in it.parts)]
        if case in ("qlora", "dora"):  # dequantized / DoRA-rescaled tensors are made whole
            assert all(c[0].whole for c in fused)
        else:
            assert max(len(c) for c in fused) > 1, "no fused tensor was cut into chunks: no chunk boundary seen"
    finally:
        source.close()


def one_tensor(tmp_path, w: np.ndarray, **adapter) -> Item:
    """An item made of `w` alone (a copy), or fused with a LoRA (a (in, r), b (r, out)) to float16."""
    save_file({"w": w, **adapter}, tmp_path / "src.safetensors")
    f = SafetensorsFile(tmp_path / "src.safetensors")
    if not adapter:
        return Item("t.weight", "F32", w.shape, [Part(Ref(f, "w"), "F32")])
    lora = Lora("linear", Ref(f, "a"), Ref(f, "b"), 1.0)
    return Item("t.weight", "F16", w.shape, [Part(Ref(f, "w"), "F32", lora=lora)])


@pytest.mark.parametrize("fused", [False, True])
def test_nan_in_a_late_chunk_is_refused_with_the_full_count(tmp_path, fused):
    w = np.zeros((1024, 64), np.float32)
    if fused:  # fine in float32, Inf once rounded to float16 (max 65504): rows 5 and 1000
        adapter = dict(a=np.zeros((64, 1), np.float32), b=np.zeros((1, 1024), np.float32))
        adapter["a"][3, 0], adapter["b"][0, [5, 1000]] = 1.0, 1e5
        want = 2
    else:
        adapter = {}
        w[5, 0], w[1000, 7:10] = np.nan, np.inf
        want = 4
    item = one_tensor(tmp_path, w, **adapter)
    assert len(split(item, CHUNK, ROWS)) > 4
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BridgeError, match=f"{want} of 65536 values of t.weight are NaN or Inf"):
        write_weights([item], out, chunk_bytes=CHUNK, lookahead_bytes=2 * CHUNK, progress=False, rows=ROWS)
    with pytest.raises(BridgeError, match=f"{want} of 65536 values of t.weight are NaN or Inf"):
        materialize(item)  # the whole-tensor path says the same


def test_a_stream_of_chunks_hashes_as_the_file(tmp_path):
    """Buffers are reused only once hashed: the digest is the file's even with two buffers in flight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 64), np.float32)
    item = one_tensor(tmp_path, w)
    out = tmp_path / "out"
    out.mkdir()
    hasher = StreamHasher("sha256")
    write_weights([item], out, chunk_bytes=8 << 10, lookahead_bytes=16 << 10, progress=False, hasher=hasher)
    data = (out / "model.safetensors").read_bytes()
    assert hasher.digests() == {"model.safetensors": "sha256:" + hashlib.sha256(data).hexdigest()}
    assert data.endswith(w.tobytes())
    hasher.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e5m2"])
def test_the_nan_inf_scan_sees_every_bit_pattern(dtype):
    """The scan's fast 'none' test (two max reductions of the bits) against float32's isfinite: every
    bit pattern of the type counted, and each NaN/Inf pattern alone among finite values found."""
    import ml_dtypes

    from mlx_bridge.formats.dtypes import count_nonfinite

    dt = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    ut = np.dtype(f"u{dt.itemsize}")
    every = np.arange(1 << (8 * dt.itemsize)).astype(ut).view(dt)
    bad = ~np.isfinite(every.astype(np.float32))
    assert count_nonfinite(every) == bad.sum() > 0
    assert count_nonfinite(every[~bad]) == 0
    finite = np.zeros(100, dt)
    for v in every[bad]:
        finite[57] = v
        assert count_nonfinite(finite) == 1, hex(int(np.array(v).view(ut)))


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled", "head-first"])
def test_the_source_hash_fed_in_any_order_is_the_files(tmp_path, order, monkeypatch):
    """Pieces handed over in any order, overlapping or not, with gaps no one hands over: the digest is the
    file's, and in file order only the gaps are read from disk."""
    import mlx_bridge.translate.source_hash as sh

    data = np.random.default_rng(1).integers(0, 256, 100_000, np.uint8).tobytes()
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    spans = [(300 + k * 9000, 8000) for k in range(10)] + [(95_000, 3000), (96_000, 4000)]  # the last two overlap
    if order == "reversed":
        spans = spans[::-1]
    elif order == "shuffled":
        spans = [spans[i] for i in np.random.default_rng(2).permutation(len(spans))]
    elif order == "head-first":  # lm_head: written first, stored last
        spans = spans[-1:] + spans[:-1]
    read = []
    real = sh._File.read
    monkeypatch.setattr(sh._File, "read", lambda self, a, b, stop: read.append((a, b)) or real(self, a, b, stop))
    h = sh.SourceHasher([p], "sha256")
    h.expect({p: spans})
    for off, n in spans:
        for b in range(off, off + n, 3000):  # each span in pieces, as chunks
            h.feed(p, b, data[b: min(b + 3000, off + n)])
    assert h.finish()[p].result() == "sha256:" + hashlib.sha256(data).hexdigest()
    h.close()
    if order == "file":  # only what no span covers is read: the header and the gaps between spans
        covered = np.zeros(len(data), bool)
        for off, n in spans:
            covered[off: off + n] = True
        assert sum((b or len(data)) - a for a, b in read) == (~covered).sum() == 15_000, read


def test_an_hf_export_records_the_base_files_hash(zoo, tmp_path):
    """The base's hash in the manifest comes from the bytes the export read (lm_head first, stored last
    in an mlx-lm file): it must equal a fresh hash of each file."""
    from mlx_bridge import export
    from mlx_bridge.manifest import Manifest

    base = zoo.mlx("llama", dtype="bfloat16")
    out = export(zoo.adapter(base, "lora-bf16", rank=4, num_layers=2), tmp_path / "out", verify=False,
                 progress=False, log=lambda *a: None)
    src = Manifest.load(out).export["source_hashes"]
    files = sorted(base.glob("model*.safetensors"))
    assert files and all(src[f.name] == hash_file(f) for f in files), src


@pytest.mark.parametrize("layout", ["names", "shuffled"])
def test_a_base_in_name_order_is_hashed_from_what_the_export_reads(zoo, tmp_path, layout, monkeypatch):
    """A base whose file holds its tensors in the export's order (by name, as HF's safetensors writes) is
    hashed from the bytes the export reads; one in another order (MLX writes hash-map order) is hashed
    on its own from the start. The manifest's hash is the file's either way."""
    import shutil

    import mlx_bridge.translate.export as ex
    from mlx_bridge import export
    from mlx_bridge.formats import StreamWriter, TensorSpec
    from mlx_bridge.manifest import Manifest
    from mlx_bridge.testing.adapters import make_adapter

    base = tmp_path / "base"
    shutil.copytree(zoo.mlx("llama", dtype="bfloat16"), base)
    (f,) = base.glob("model*.safetensors")
    tensors = read_tensors(base)
    names = sorted(tensors)
    if layout == "shuffled":
        names = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    f.unlink()
    with StreamWriter(f, [TensorSpec(n, *tensors[n][:2]) for n in names], {"format": "mlx"}) as w:
        for n in names:
            w.write(n, tensors[n][2])
    fed = []
    real = ex.SourceHasher
    monkeypatch.setattr(ex, "SourceHasher", lambda paths, *a: fed.extend(paths) or real(paths, *a))
    ad = make_adapter(base, tmp_path / "ad", rank=4, num_layers=2)
    out = export(ad, tmp_path / "out", verify=False, progress=False, log=lambda *a: None)
    assert fed == ([f] if layout == "names" else [])
    assert Manifest.load(out).export["source_hashes"][f.name] == hash_file(f)
