"""Issue 15, speed and memory of `export --format gguf`: the numpy quantizers against llama.cpp's own C
reference functions, and the row-block streaming against the whole-tensor export.

- The quantizers (Q4_K, Q5_K, Q6_K in translate/gguf/kquants.py; Q8_0 in types.py; gguf-py's MXFP4) give the bytes of
  ggml's `quantize_row_*_ref` (called through ctypes in the libggml-base that llama-cpp-python ships)
  on random rows and on the edge cases of the C code (flat and all-zero sub-blocks, ties of nearest_int
  and roundf, tiny and huge values, min > 0).
- A tensor bigger than the row block (the 32000-token embedding, every weight at 128-row blocks)
  exported in blocks gives the same file, byte for byte, as exported whole: LoRA on a float base,
  DoRA on a 4-bit base, and stacked experts; the manifest's hash (hashed while writing) is the file's.
"""

from __future__ import annotations

import ctypes
import blake3
import json
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from mlx_bridge.testing.gguf import GgufZoo  # noqa: E402
from mlx_bridge.translate.gguf import kquants, types, write  # noqa: E402

REF = {"Q4_K": ("q4_K", 256, 144, kquants.quantize_q4_k), "Q5_K": ("q5_K", 256, 176, kquants.quantize_q5_k),
       "Q6_K": ("q6_K", 256, 210, kquants.quantize_q6_k), "Q8_0": ("q8_0", 32, 34, types.quantize_q8_0),
       # gpt_oss's experts (gguf-py's MXFP4, through types.quantize)
       "MXFP4": ("mxfp4", 32, 17, lambda x: types.quantize(x, types.T.MXFP4))}


def ggml_ref(x: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's quantize_row_<name>_ref on x (rows, k), as bytes (rows, k / block * block bytes)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    c_name, block, size, _ = REF[name]
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.size // block * size, np.uint8)
    getattr(lib, f"quantize_row_{c_name}_ref")(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                                               ctypes.c_int64(x.size))
    return out.reshape(x.shape[0], -1)


def edge_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = rng.standard_normal((16, 1024)).astype(np.float32)
    spiky = n * np.where(rng.random(n.shape) < 0.05, 60, 1).astype(np.float32)
    spiky[:, :32] = 0  # an all-zero sub-block
    spiky[:, 256:288] = 5.0  # a flat one
    spiky[:, 512:520] = -1e-30
    return {"weights": rng.standard_normal((64, 2048)).astype(np.float32) * np.float32(0.02),
            "normal": n, "positive": np.abs(n), "negative": -np.abs(n), "zeros": np.zeros((2, 512), np.float32),
            "ones": np.ones((2, 512), np.float32), "small ints (ties)": rng.integers(-3, 4, (16, 1024)).astype(np.float32),
            "halves (roundf ties)": (rng.integers(-254, 255, (16, 1024)) / 2).astype(np.float32),
            "tiny": n * np.float32(1e-20), "large": n * np.float32(1e10), "spiky": spiky}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # "large" overflows fp16 d to inf, as in C
@pytest.mark.parametrize("name", list(REF))
def test_quantizer_equals_ggml_reference(name):
    """Every byte equals ggml's reference quantizer (what llama_model_quantize runs without an imatrix)."""
    f = REF[name][3]
    bad = [case for case, x in edge_rows().items() if not np.array_equal(f(x), ggml_ref(x, name))]
    assert not bad, f"{name}: bytes differ from quantize_row_{REF[name][0]}_ref on {bad}"


@pytest.fixture(scope="module")
def gz(tmp_path_factory):
    return GgufZoo(tmp_path_factory.mktemp("gguf-stream"))


def _export(src: Path, out: Path, gguf_type: str) -> bytes:
    from mlx_bridge import export

    export(str(src), str(out), format="gguf", gguf_type=gguf_type, progress=False, log=lambda *a: None)
    (f,) = out.glob("*.gguf")
    data = f.read_bytes()
    files = json.loads((out / "manifest.json").read_text())["files"]  # hashed while writing: the file's hash
    assert files[f.name] == "blake3:" + blake3.blake3(data).hexdigest(), f"manifest hash of {f.name} is not the file's"
    return data


def _sources(gz: GgufZoo, case: str) -> Path:
    from mlx_bridge.testing.adapters import make_adapter
    from mlx_bridge.testing.models import mlx_convert

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    if case == "llama+lora":
        return gz.adapter(gz.mlx("llama", "llama-spm", **shape))
    if case == "mixtral+lora":
        return gz.adapter(gz.mlx("mixtral", "llama-spm", num_local_experts=4, **shape))
    if case == "gpt_oss":  # MXFP4 experts, stacked in MLX: written from them expert by expert (tensors.expert_items)
        return gz.mlx("gpt_oss", "llama-spm", **shape)
    base = gz.mlx("llama", "llama-spm", **shape)  # its HF model, converted again to 4-bit, with a DoRA adapter
    q4 = gz.root / "mlx-llama-q4"
    if not (q4 / "config.json").exists():
        hf = gz.root / "hf-llama-llama-spm-hidden_size256-intermediate_size512-num_hidden_layers2"
        mlx_convert(hf, q4, quantize=True, bits=4, group_size=64)
        (q4 / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
    return make_adapter(q4, gz.root / "mlx-llama-q4-dora", fine_tune_type="dora", rank=4)


@pytest.mark.slow
@pytest.mark.parametrize("case,gguf_type", [("llama+lora", "q4_k_m"), ("llama-q4+dora", "q8_0"),
                                            ("mixtral+lora", "q4_k_m"), ("gpt_oss", "q8_0")])
def test_row_blocks_give_the_whole_tensor_bytes(gz, tmp_path, monkeypatch, case, gguf_type):
    """Exported in 128-row blocks (the embedding in 250), the file equals the export of whole tensors."""
    src = _sources(gz, case)
    monkeypatch.setattr(write, "BLOCK_BYTES", 1 << 40)
    whole = _export(src, tmp_path / "whole", gguf_type)
    seen = []
    row_blocks = write.row_blocks
    monkeypatch.setattr(write, "row_blocks", lambda t, n: seen.append(bs := row_blocks(t, n)) or bs)
    monkeypatch.setattr(write, "BLOCK_BYTES", 1 << 16)
    blocked = _export(src, tmp_path / "blocked", gguf_type)
    assert max(len(bs) for bs in seen) >= 250, "the embedding was not split into row blocks"
    if case.startswith(("mixtral", "gpt_oss")):
        assert any(len({b.item for b in bs}) > 1 for bs in seen), "no expert stack was split"
    assert len(blocked) == len(whole) and blocked == whole, f"{case} {gguf_type}: blocked export differs"


@pytest.mark.slow
def test_rows_of_every_item_equal_the_whole(gz):
    """`parts.materialize(item, rows)` is `materialize(item)[rows]` for every 2-D item of a plan with LoRA on
    the embedding, the output and the attention (linear, embedding kinds), at 128-row-aligned ranges."""
    from mlx_bridge.testing.adapters import make_adapter
    from mlx_bridge.translate.parts import materialize
    from mlx_bridge.translate.plan import build_plan
    from mlx_bridge.translate.source import open_source

    base = gz.mlx("llama", "llama-spm", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    src = make_adapter(base, gz.root / "mlx-llama-lora-embed", rank=4,
                       keys=["self_attn.q_proj", "self_attn.k_proj", "model.embed_tokens", "lm_head"])
    plan = build_plan(open_source(src), "float32")
    kinds = {i.parts[0].lora.kind for i in plan.items if i.parts[0].lora}
    assert kinds == {"linear", "embedding"}, kinds
    for item in plan.items:
        if len(item.shape) != 2:
            continue
        assert item.row_sliceable, item.name
        whole, n = materialize(item), item.shape[0]
        for r0, r1 in [(0, min(128, n)), (128 * (n // 256), n), (0, n)]:
            np.testing.assert_array_equal(materialize(item, (r0, r1)), whole[r0:r1], err_msg=f"{item.name}[{r0}:{r1}]")


def test_ggml_one_dimensional_tensors_stay_f32():
    """llama_model_quantize quantizes only tensors ggml counts as 2-D or more: a (1, hidden) weight (qwen2_moe's
    shared-expert gate) stays F32 at q4_k_m, where a (hidden, hidden) one is quantized."""
    from gguf import GGMLQuantizationType as T

    from mlx_bridge.translate.gguf.types import TypePicker

    p = TypePicker("q4_k_m", n_layer=2, n_attn_v=2, n_expert=4, tied=False)
    assert p.pick("blk.0.ffn_gate_inp_shexp.weight", (1, 256)) == T.F32
    assert p.pick("blk.0.ffn_up_shexp.weight", (256, 256)) != T.F32


def test_plain_configs_resolve_as_transformers(monkeypatch):
    """plain_configs.json is what the installed transformers says (scripts/derive_gguf_configs.py), and for each
    of its types with a tiny config `gguf_config` resolves that config (and the config with each standard name
    given by its alias) without transformers exactly as through transformers' config class."""
    import warnings

    from mlx_bridge.archs.tiny import tiny_config
    from mlx_bridge.translate.gguf import hparams, plain_configs

    data = json.loads(plain_configs.DATA.read_text())
    assert data == plain_configs.derive(plain_configs.model_types()), \
        "plain_configs.json is stale: run scripts/derive_gguf_configs.py"
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "mixtral"} <= set(data["plain"])
    cases = []
    for mt, aliases in data["plain"].items():
        try:
            cfg = dict(tiny_config(mt), model_type=mt)
        except (KeyError, ValueError):  # a language model's type without a tiny config of its own
            continue
        cases.append(cfg)
        cases += [{**{k: v for k, v in cfg.items() if k != std}, alias: cfg[std]} for std, alias in aliases.items()
                  if std in cfg and alias not in cfg]
    assert len(cases) >= 40, len(cases)
    slow_path = sorted({c["model_type"] for c in cases if plain_configs.resolve(c) is None})
    assert not slow_path, f"tiny configs that set a key the class may compute from: {slow_path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = [hparams.gguf_config(c) for c in cases]
        monkeypatch.setattr(plain_configs, "resolve", lambda cfg: None)
        slow = [hparams.gguf_config(c) for c in cases]
    bad = [c["model_type"] for c, f, s in zip(cases, fast, slow) if f != s]
    assert not bad, f"resolved otherwise than by transformers: {bad}"


def test_vocabulary_packed_as_gguf_py_packs_it():
    """The metadata of a real vocabulary (llama-spm's tokens, types, scores) and of a BPE-sized synthetic one (200k
    strings of 0-12 random code points, merges, types) packed in bulk by `kvpack.Writer` is byte for byte gguf-py's
    element-by-element packing; mixed, short and overflowing arrays are left to gguf-py."""
    import gguf

    from mlx_bridge.testing.gguf import vocab_file
    from mlx_bridge.translate.gguf.kvpack import Writer, pack_array

    r = gguf.GGUFReader(vocab_file("llama-spm"))
    spm = {k: [conv(r.fields[k].parts[i]) for i in r.fields[k].data] for k, conv in
           [("tokenizer.ggml.tokens", lambda p: bytes(p).decode()), ("tokenizer.ggml.token_type", lambda p: int(p[0])),
            ("tokenizer.ggml.scores", lambda p: float(p[0]))]}
    rng = np.random.default_rng(0)
    cps = rng.choice(np.r_[32:127, 161:1200, 0x4E00:0x4FFF, 0x1F600:0x1F64F], 200_000 * 12)
    words = ["".join(map(chr, cps[i * 12:i * 12 + n])) for i, n in enumerate(rng.integers(0, 13, 200_000))]
    bpe = {"tokenizer.ggml.tokens": words, "tokenizer.ggml.token_type": rng.integers(1, 7, len(words)).tolist(),
           "tokenizer.ggml.merges": [f"{a} {b}" for a, b in zip(words[::2], words[1::2])]}
    for vocab in (spm, bpe):
        packed = {}
        for cls in (gguf.GGUFWriter, Writer):
            w = cls(None, "llama")
            w.add_token_list(vocab["tokenizer.ggml.tokens"])
            w.add_token_types(vocab["tokenizer.ggml.token_type"])
            if "tokenizer.ggml.scores" in vocab:
                w.add_token_scores(vocab["tokenizer.ggml.scores"])
            if "tokenizer.ggml.merges" in vocab:
                w.add_token_merges(vocab["tokenizer.ggml.merges"])
            packed[cls] = [w._pack_val(v.value, v.type, True, v.sub_type) for v in w.kv_data[0].values()]
        assert packed[Writer] == packed[gguf.GGUFWriter]
    n = 2 * 1024
    assert pack_array(["a", 1] * n) is None and pack_array([1.0] * 8) is None
    assert pack_array([3e38 * 10] * n) is None and pack_array([2 ** 40] * n, gguf.GGUFValueType.INT32) is None
