"""Issue 15: `export --format gguf`, checked by llama.cpp itself (llama-cpp-python, built from source).

Tiny models carry real vocabularies (llama.cpp's own `models/ggml-vocab-*.gguf`, rebuilt as HF
tokenizer files): HF model -> mlx-lm convert (float32) [-> LoRA adapter] -> export gguf -> llama.cpp.
The reference is transformers on the `--format hf` export of the same source (the same fused weights).

llama.cpp runs with a float32 KV cache (its default f16 cache alone moves f32 logits by 1e-3). Figures:
f32 logits within 1e-4 of transformers (measured 1.4e-6 on llama; 5.9-6.5e-5 on the MLA types deepseek_v2/v3 and
glm4_moe_lite, whose absorbed attention llama.cpp computes in another order), f16 within 1e-2 (2.2e-3), q8_0
within 0.25 (0.10-0.12), greedy continuations equal for f32/f16, and for q8_0 the same top-1 next
token at >= 85% of 48 teacher-forced positions (measured 0.90-0.98: random tiny models have near-flat logits).
K-quant files are byte-compared with `llama_model_quantize` run on our f32 file.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from mlx_bridge.testing.gguf import GgufZoo, vocab_file, vocab_tests  # noqa: E402
from test_export_common import load_hf, run_export  # noqa: E402

PROMPT = [128000, 791, 4062, 14198, 39935, 35308, 927, 279]  # llama-bpe ids: "<bos>The quick brown fox jumps over the"
TOL = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.25}
F32_CACHE = dict(type_k=0, type_v=0)  # GGML_TYPE_F32
N_GEN = 12


@pytest.fixture(scope="module")
def gz(tmp_path_factory):
    """Cache of tokenizers, models and exports for this module's tests, removed after them (about 19 GB once the
    byte tests have run; pytest would keep it with its last three runs)."""
    root = tmp_path_factory.getbasetemp() / "gguf-zoo"
    yield GgufZoo(root)
    shutil.rmtree(root, ignore_errors=True)


def gguf_path(d: Path) -> Path:
    (p,) = sorted(d.glob("*.gguf"))
    return p


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0, **F32_CACHE)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_threads=2, seed=0, **F32_CACHE)
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == n:
            break
    return out


def load_hf_any(d: Path):
    """A multimodal wrapper in transformers (image-text-to-text), failing on any missing/unexpected key."""
    import torch
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), f"{d}: loading info not clean: {info}"
    lm = getattr(model, "language_model", None)  # llama4: text goes to its own causal LM (as deploy's HFRunner does)
    return (lm if lm is not None and lm.get_output_embeddings() is not None else model).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


CASES = {"llama": ("llama", "llama-bpe"), "llama+lora": ("llama", "llama-bpe"), "mistral": ("mistral", "llama-bpe"),
         "qwen2": ("qwen2", "qwen2"), "qwen3": ("qwen3", "qwen2"), "qwen3_moe+lora": ("qwen3_moe", "qwen2"),
         "mixtral+lora": ("mixtral", "llama-spm"), "phi3": ("phi3", "phi-3"), "gemma2": ("gemma2", "llama-spm"),
         "gemma3_text": ("gemma3_text", "llama-spm"), "qwen2_moe+lora": ("qwen2_moe", "qwen2"),
         "olmoe+lora": ("olmoe", "llama-bpe"), "gemma+lora": ("gemma", "llama-spm-json")}
# every other GGUF-exported type: tiny model, 32k SentencePiece vocab (the tokenizer is tested apart)
CASES.update({t: (t, "llama-spm") for t in ("olmo2", "olmo3", "granite", "cohere", "cohere2", "starcoder2", "smollm3",
                                            "exaone", "internlm3", "iquestcoder", "seed_oss", "ernie4_5", "hunyuan_v1_dense",
                                            "nemotron", "glm4", "phi", "stablelm", "gpt2", "gpt_bigcode", "gpt_neox",
                                            "glm4_moe", "dots1", "exaone4", "granitemoe", "ministral3", "mamba", "falcon_mamba", "mamba2",
                                            "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "gemma3", "mistral3", "qwen3_5", "qwen3_5_moe", "qwen3_next")})
# issue 15, second round (s3-15a)
CASES.update({t: (t, "llama-spm") for t in ("gpt_oss", "llama4", "lfm2", "granitemoehybrid", "falcon_h1", "nemotron_h",
                                                   "minimax_m2")})
CASES["gpt_oss+lora"] = ("gpt_oss", "llama-spm")  # an adapter on the experts: no longer MXFP4 values, written as f32
CASES["granitemoehybrid+nope"] = ("granitemoehybrid", "llama-spm")  # attention without rope (the tiny's null is rope in mlx-lm)
# multimodal wrappers: the GGUF holds the language model; transformers runs the whole model (vision tower from the
# HF checkpoint, as mlx-lm drops it) on text only
WRAPPERS = ("gemma3", "mistral3", "qwen3_5", "qwen3_5_moe", "llama4")
_SCALES = dict(attention_multiplier=0.1, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0)
OVERRIDES = {"granite": _SCALES, "granitemoe": _SCALES,
             "olmoe": dict(num_key_value_heads=4),  # llama.cpp's olmoe: k_norm over n_embd (no GQA)
             "dots1": dict(num_key_value_heads=4),  # llama.cpp's dots1: k/v as wide as q (no GQA)
             "smollm3": dict(num_hidden_layers=4),  # layer 3 is smollm3's first without rope
             "exaone4": dict(num_hidden_layers=64),  # llama.cpp windows exaone4 only in its 64-layer shape
             "qwen3_next": dict(rms_norm_eps=1e-6),  # llama.cpp's qwen3next: the gated delta net's l2 norm eps is the norms'
             "falcon_mamba": dict(mixer_rms_eps=1e-5),  # llama.cpp's mamba: one epsilon for the norms and B/C/dt
             "granitemoehybrid+nope": dict(position_embedding_type="nope"),
             "minimax_m2": dict(rotary_dim=8)}  # rope over half of each head
# third session (#15b): a block of its own
CASES.update({t: (t, "llama-spm") for t in ("apertus", "minicpm3", "ernie4_5_moe", "exaone_moe", "glm", "afmoe", "glm_moe_dsa", "llava", "qwen3_vl",
                                            "qwen3_vl_moe")})
WRAPPERS += ("llava", "qwen3_vl", "qwen3_vl_moe")
# M-RoPE sections covering every rotary pair: llama.cpp's interleaved M-RoPE rotates the others by position 0 on text
_IMROPE = dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2])))
HF_BASE = ("ernie4_5_moe",)  # mlx-lm drops a tensor the export needs (its routing bias): --hf-base for both exports
OVERRIDES.update({"minicpm3": dict(max_position_embeddings=128),  # longrope unscaled (llama.cpp's has no scale)
                  "glm_moe_dsa": dict(index_topk=8),
                  "qwen3_vl": _IMROPE, "qwen3_vl_moe": _IMROPE,  # the indexer picks 8 of the 48 keys (topk 2048: every key)
                  "afmoe": dict(num_hidden_layers=4, layer_types=None, mup_enabled=True)})  # llama.cpp: full every 4th, muP
# llama.cpp's llama4 chunks attention in 8192 tokens (the registry's tiny chunks in 8, so its parity probes chunk)
OVERRIDES["llama4"] = dict(text_config=dict(attention_chunk_size=8192))
OVERRIDES["nemotron_h"] = dict(hybrid_override_pattern="M*-")  # llama.cpp's nemotron_h: no MoE blocks (nemotron_h_moe)
PARAMS = [(c, t) for c in CASES for t in (("f32", "f16", "q8_0") if c in ("llama", "llama+lora", "qwen2") else
                                          ("f32", "f16") if c in ("gemma+lora", "qwen2_moe+lora") else ("f32",))]
# llama.cpp's CPU GELU reads an f16 lookup table (ggml-cpu/vec.h GGML_GELU_FP16): f32 logits move by 1e-3 (measured
# 0.9-1.4e-3: gemma, starcoder2, phi, gpt2, gpt_bigcode, gpt_neox)
ARCH_TOL = {a: 5e-3 for a in ("gemma", "gemma2", "gemma3_text", "gemma3", "starcoder2", "phi", "gpt2", "gpt_bigcode", "gpt_neox")}
# gpt_oss: its MXFP4 experts stay MXFP4 (exact: test_gpt_oss_mxfp4_experts_exact), and ggml's CPU MXFP4 matmul rounds
# the activations to Q8_0 (vec_dot_type): f32 logits move by 2.8e-2 (1.5e-6 with the experts written as f32)
ARCH_TOL["gpt_oss"] = 0.05


@pytest.mark.slow
@pytest.mark.parametrize("case,gguf_type", PARAMS)
def test_llama_cpp_matches_transformers(gz, case, gguf_type):
    """llama.cpp on the GGUF computes what transformers computes on the HF export of the same source:
    logits on 48 random tokens within TOL; f32/f16: the same 12 greedy tokens; q8_0: the same top-1
    next token at >= 85% of the 48 positions (measured 0.90-0.98)."""
    arch, vocab = CASES[case]
    src = gz.mlx(arch, vocab, **OVERRIDES.get(case, OVERRIDES.get(arch, {})))
    if "+lora" in case:
        src = gz.adapter(src)
    model = load_hf_any(gz.export(src, "hf", hf_base=True)) if arch in WRAPPERS else load_hf(gz.export(src, "hf", hf_base=arch in HF_BASE))
    path = gguf_path(gz.export(src, "gguf", gguf_type, hf_base=arch in HF_BASE))
    ids = np.random.default_rng(0).integers(3, 32000, 48).tolist()  # valid ids in every vocab used here
    got, want = llama_logits(path, ids), hf_logits(model, ids)
    diff, tol = np.abs(got - want).max(), max(TOL[gguf_type], ARCH_TOL.get(arch, 0))
    print(f"{case} {gguf_type}: max |logit diff| {diff:.2e}")  # the figure, with -s
    assert diff <= tol, f"{case} {gguf_type}: max |logit diff| {diff:.3e} > {tol}"
    if gguf_type == "q8_0":
        agree = np.mean(got.argmax(-1) == want.argmax(-1))
        assert agree >= 0.85, f"{case} q8_0: top-1 next token equal at {agree:.0%} of {len(ids)} positions"
    else:
        g_cpp, g_hf = llama_greedy(path, ids[:8], N_GEN), hf_greedy(model, ids[:8], N_GEN)
        assert g_cpp == g_hf, f"{case} {gguf_type}: greedy {g_cpp} != transformers {g_hf}"


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["llama-bpe", "qwen2", "llama-spm", "llama-spm-json"])
def test_vocab_is_llama_cpps_own(gz, vocab):
    """Tokens, types, merges/scores and pre-tokenizer equal llama.cpp's vocab file, and llama.cpp
    tokenizes its own test strings with our GGUF as it does with its file. llama-spm-json: the SentencePiece
    vocab from tokenizer.json alone (scores are merge ranks there: the same order, not the same numbers)."""
    arch = "qwen2" if vocab == "qwen2" else "llama"
    path = gguf_path(gz.export(gz.mlx(arch, vocab), "gguf", "f16"))
    json_only, vocab = vocab.endswith("-json"), vocab.removesuffix("-json")
    ours, ref = gguf.GGUFReader(path).fields, gguf.GGUFReader(vocab_file(vocab)).fields
    # llama.cpp's file types its [PAD<i>] padding USER_DEFINED (an older converter); today's writes UNUSED
    pad = {i for i, t in enumerate(ref["tokenizer.ggml.tokens"].contents()) if re.fullmatch(r"\[PAD\d+\]", t)}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id"):
        if key in ref:
            a, b = ours[key].contents(), ref[key].contents()
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):  # the model may be cut at the padding
                assert set(range(len(a), len(b))) <= pad, f"{vocab}: {key} has {len(a)} entries, llama.cpp {len(b)}"
                b = b[: len(a)]
            if key == "tokenizer.ggml.token_type":
                assert all(ours_t == gguf.TokenType.UNUSED for i, ours_t in enumerate(a) if i in pad)
                a, b = [t for i, t in enumerate(a) if i not in pad], [t for i, t in enumerate(b) if i not in pad]
            if key == "tokenizer.ggml.scores" and json_only:  # SentencePiece merges the best-scored pair first
                pieces = ref["tokenizer.ggml.tokens"].contents()  # pieces a merge makes (not single characters)
                normal = [i for i, t in enumerate(ref["tokenizer.ggml.token_type"].contents())
                          if t == 1 and len(pieces[i]) > 1 and b[i] > -1e8]
                a, b = sorted(normal, key=lambda i: (-a[i], i)), sorted(normal, key=lambda i: (-b[i], i))
            assert a == b, f"{vocab}: {key} differs"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text, ids in vocab_tests(vocab_file(vocab)):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, f"{vocab}: {text!r}"


def _quantize_with_llama_cpp(src: Path, dst: Path, ftype: int, keep: dict[str, int] | None = None) -> None:
    """`llama_model_quantize(src, dst, ftype)`; `keep`: tensor name -> its type in `src`, kept as it is (llama.cpp's
    `--tensor-type` overrides, by the exact name: the quantizer copies a tensor already of its target type)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if keep:
        overrides = (llama_cpp.llama_model_tensor_override * (len(keep) + 1))()  # ended by a null pattern
        for o, (name, ty) in zip(overrides, keep.items()):
            o.pattern, o.type = f"^{re.escape(name)}$".encode(), ty
        params.tt_overrides = overrides
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({src}) returned {rc}"


BYTES = ([("llama", t) for t in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")]
         + [(a, "q4_k_m") for a in ("mixtral", "mamba", "deepseek_v3", "qwen2_moe", "lfm2", "minimax_m2", "falcon_h1")])


@pytest.mark.slow
@pytest.mark.parametrize("arch,gguf_type", BYTES)
def test_quantized_bytes_equal_llama_cpp(gz, tmp_path, arch, gguf_type):
    """Every tensor's type and bytes equal `llama_model_quantize` run on our f32 GGUF (hidden 256: K-quant rows;
    8 layers for the `_m` mixes' layer pattern; mixtral with 8 experts for llama.cpp's 8-expert rules; deepseek_v3
    for MLA's attn_k_b/attn_v_b)."""
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    if arch == "mixtral":
        shape.update(num_hidden_layers=2, num_local_experts=8)
    if arch == "mamba":  # d_inner = 2 x hidden; the conv kernel stays float32 as llama.cpp keeps it
        shape.update(num_hidden_layers=2)
    if arch in ("lfm2", "falcon_h1"):  # their layer types / Mamba2 shapes as the tiny configs have them
        shape.update(num_hidden_layers=2)
    assert_bytes_equal(gz, gz.adapter(gz.mlx(arch, "llama-spm", **shape)), tmp_path, gguf_type)


def assert_bytes_equal(gz, src: Path, tmp_path: Path, gguf_type: str, hf_base: bool = False) -> None:
    """Our `gguf_type` export of `src`: every tensor's type and bytes those of `llama_model_quantize` on our f32 export."""
    from mlx_bridge.translate.gguf.types import GGUF_TYPES

    f32 = gguf_path(gz.export(src, "gguf", "f32", hf_base=hf_base))
    ref_path = tmp_path / "ref.gguf"
    # gpt_oss's MXFP4 experts are MXFP4 in every file (as llama.cpp's converter writes them), which llama.cpp's
    # quantizer refuses to requantize: it keeps them, as the export does
    keep = {t.name: int(t.tensor_type) for t in gguf.GGUFReader(f32).tensors
            if t.tensor_type == gguf.GGMLQuantizationType.MXFP4}
    _quantize_with_llama_cpp(f32, ref_path, int(GGUF_TYPES[gguf_type][0]), keep)
    ours = {t.name: t for t in gguf.GGUFReader(gguf_path(gz.export(src, "gguf", gguf_type, hf_base=hf_base))).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors}
    assert sorted(ours) == sorted(ref)  # (llama_model_quantize sorts rope_freqs among the others; we write it first)
    bad = [f"{n}: {ours[n].tensor_type.name} vs {ref[n].tensor_type.name}" for n in ref
           if ours[n].tensor_type != ref[n].tensor_type]
    assert not bad, f"{gguf_type}: tensor types differ: {bad}"
    bad = [n for n in ref if bytes(ours[n].data.tobytes()) != bytes(ref[n].data.tobytes())]
    assert not bad, f"{gguf_type}: bytes differ in {bad}"
    if gguf_type in ("q4_k_m", "q5_k_m"):
        assert {"Q4_K", "Q6_K"} & {t.tensor_type.name for t in ours.values()}, "no K-quant tensor was written"


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "mlx_bridge", "export", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_bad_input_one_line_exit_2(gz, tmp_path):
    """Unknown --gguf-type, an arch llama.cpp has no converter for, a tokenizer llama.cpp can't represent."""
    from mlx_bridge.testing.adapters import Zoo

    src = gz.mlx("llama")
    wordlevel = Zoo(gz.root / "zoo").mlx("llama")  # the tiny word-level tokenizer
    helium = Zoo(gz.root / "zoo").mlx("helium")
    cases = [((src, "--gguf-type", "q3_k_xl"), "--gguf-type 'q3_k_xl'"),
             ((helium,), "model_type 'helium' has no GGUF export: llama.cpp (llama-cpp-python 0.3.36) has no converter"),
             ((wordlevel,), "WordLevel tokenizer has no llama.cpp representation")]
    for args, needle in cases:
        out = tmp_path / "out"
        r = _cli(args[0], "--out", out, "--format", "gguf", *args[1:])
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
        assert not out.exists()


def test_unknown_pre_tokenizer_warns_once(gz, tmp_path):
    """A split regex llama.cpp doesn't know: the closest pre-tokenizer and one warning."""
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in gz.tok("llama-bpe").iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    tj = json.loads((tok / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = \
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].replace("{1,3}", "{1,4}")
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    from mlx_bridge.translate.gguf.vocab import PRE, read_vocab

    v = read_vocab(tok, 128256, "llama")
    assert PRE["regex"][v.pre] == PRE["regex"]["llama-bpe"] and len(v.warnings) == 1 and "closest" in v.warnings[0]


@pytest.mark.slow
def test_gpt_oss_mxfp4_experts_exact(gz):
    """gpt_oss's MXFP4 experts are written as MXFP4 (as llama.cpp's converter keeps them) holding exactly the values
    transformers computes with: gate/up de-interleaved, each (E, out, in), whatever the --gguf-type."""
    from safetensors.numpy import load_file

    src = gz.mlx("gpt_oss", "llama-spm")
    hf = {}
    for f in gz.export(src, "hf").glob("*.safetensors"):
        hf.update(load_file(str(f)))
    ts = {t.name: t for t in gguf.GGUFReader(gguf_path(gz.export(src, "gguf", "f32"))).tensors}
    for i in range(2):
        gate_up, down = hf[f"model.layers.{i}.mlp.experts.gate_up_proj"], hf[f"model.layers.{i}.mlp.experts.down_proj"]
        want = {"ffn_gate_exps": gate_up[..., ::2], "ffn_up_exps": gate_up[..., 1::2], "ffn_down_exps": down}
        for name, w in want.items():
            t = ts[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4, (name, t.tensor_type.name)
            got = gguf.dequantize(t.data, t.tensor_type).reshape(w.shape[0], w.shape[2], w.shape[1])
            np.testing.assert_array_equal(got, w.swapaxes(1, 2))


@pytest.mark.slow
def test_llama4_language_model_only_one_warning(gz):
    """Llama 4: the language model is written and one warning says the vision tower's mmproj file is not."""
    from mlx_bridge.translate.gguf import prepare_gguf
    from mlx_bridge.translate.source import open_source

    job = prepare_gguf(open_source(str(gz.mlx("llama4", "llama-spm", **OVERRIDES["llama4"]))), "f32", "x")
    try:
        assert len(job.warnings) == 1 and "mmproj" in job.warnings[0], job.warnings
        assert job.plan.items and all("vision" not in i.name and "projector" not in i.name for i in job.plan.items)
    finally:
        job.close()


@pytest.mark.slow
def test_falcon_h1_multipliers_as_mlx(gz):
    """Falcon-H1's muP multipliers: mlx-lm folds them into the weights when it converts, as llama.cpp's converter does, so
    the GGUF holds MLX's weights and llama.cpp computes MLX's logits (measured 7e-7; this tiny's multipliers are not 1)."""
    import mlx.core as mx
    from mlx_lm import load

    src = gz.mlx("falcon_h1", "llama-spm", attention_in_multiplier=0.9, attention_out_multiplier=0.5, key_multiplier=0.4,
                 embedding_multiplier=2.0, lm_head_multiplier=0.25, ssm_in_multiplier=1.25, ssm_out_multiplier=0.8)
    ids = np.random.default_rng(0).integers(3, 32000, 48).tolist()
    model, _ = load(str(src))
    want = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    got = llama_logits(gguf_path(gz.export(src, "gguf", "f32")), ids)
    assert np.abs(got - want).max() <= TOL["f32"], np.abs(got - want).max()


def test_o200k_pre_tokenizer(gz, tmp_path):
    """gpt_oss's o200k split regex is llama.cpp's gpt-4o pre-tokenizer, and llama.cpp splits as the tokenizer.json
    does (qwen2's BPE vocabulary and merges under the o200k regex, on qwen2's test strings). The real o200k vocabulary
    is known by its chkhsh; this one tokenizes chktxt as qwen2 does (so its hash says qwen2): gpt-4o is set here."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    from mlx_bridge.translate.gguf.vocab import PRE, _pre_regexes, closest_pre, read_vocab

    tok = tmp_path / "tok"
    tok.mkdir()
    for f in gz.tok("qwen2").iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    tj = json.loads((tok / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = PRE["regex"]["gpt-4o"][-1]
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    assert closest_pre(_pre_regexes(tj["pre_tokenizer"])) == ("gpt-4o", 1.0)
    assert "gpt-4o" in PRE["chkhsh"].values()
    v = replace(read_vocab(tok, 151936, "gpt_oss"), pre="gpt-4o")
    llm, hf = vocab_only(v, tok, tmp_path, "gpt-oss"), Tokenizer.from_file(str(tok / "tokenizer.json"))
    for text, _ in vocab_tests(vocab_file("qwen2")):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_modelfile_and_split(gz, tmp_path):
    """Modelfile: FROM the file, llama 3 TEMPLATE, stop tokens; --gguf-split shards load in llama.cpp."""
    src = gz.mlx("llama")
    text = (gz.export(src, "gguf", "f16") / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and "<|start_header_id|>" in text and 'PARAMETER stop "<|eot_id|>"' in text
    out = run_export(src, tmp_path / "split", format="gguf", gguf_type="f32", gguf_split="20MB", progress=False)
    shards = sorted(out.glob("*.gguf"))
    assert len(shards) > 1 and shards[0].name == f"model-f32-00001-of-{len(shards):05d}.gguf"
    whole = gguf_path(gz.export(src, "gguf", "f32"))
    np.testing.assert_array_equal(llama_logits(shards[0], PROMPT), llama_logits(whole, PROMPT))


def test_pre_tokenizer_table_is_llama_cpps():
    """pre_tokenizers.json is what scripts/derive_gguf_vocab.py reads from the pinned llama.cpp (no drift)."""
    import importlib.util

    from mlx_bridge.testing.gguf import llama_cpp_sdist
    from mlx_bridge.translate.gguf.vocab import PRE

    spec = importlib.util.spec_from_file_location("derive", Path(__file__).resolve().parents[1] / "scripts" / "derive_gguf_vocab.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    version, files = derive._read(llama_cpp_sdist())
    convert = next(files[p] for p in derive.CONVERT if p in files and "def get_vocab_base_pre" in files[p])
    chktxt, chkhsh = derive.parse_chkhsh(convert)
    assert (version, chktxt, chkhsh) == (PRE["llama_cpp"], PRE["chktxt"], PRE["chkhsh"])
    assert derive.parse_regexes(files[derive.VOCAB]) == PRE["regex"]


def vocab_only(v, tok: Path, tmp_path: Path, arch: str) -> "llama_cpp.Llama":
    """llama.cpp's vocabulary-only model of a GGUF holding just `v` (written as the export writes it)."""
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(path, arch)
    v.add_to(w, tok)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_spm_json_leading_space_warns(gz, tmp_path):
    """A SentencePiece tokenizer.json whose Metaspace skips the dummy prefix on text starting with a space
    (transformers 5's LlamaTokenizer conversion): one warning naming that, and llama.cpp tokenizes every
    test string that does not start with a space as the tokenizer.json does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mlx_bridge.translate.gguf.vocab import read_vocab

    tok = tmp_path / "tok"
    AutoTokenizer.from_pretrained(str(gz.tok("llama-spm"))).save_pretrained(str(tok))
    (tok / "tokenizer.model").unlink(missing_ok=True)
    v = read_vocab(tok, 32000, "llama")
    assert len(v.warnings) == 1 and "starts with a space" in v.warnings[0], v.warnings
    llm, hf = vocab_only(v, tok, tmp_path, "llama"), Tokenizer.from_file(str(tok / "tokenizer.json"))
    cases = [t for t, _ in vocab_tests(vocab_file("llama-spm")) if not t.startswith(" ")]
    assert len(cases) > 25
    for text in cases:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text, add_special_tokens=False).ids, text


def test_spm_json_odd_normalizer_refused(gz, tmp_path):
    """A tokenizer.json normalizer step llama.cpp's SentencePiece tokenizer doesn't take: one clear error."""
    from mlx_bridge.errors import BridgeError
    from mlx_bridge.translate.gguf.vocab import read_vocab

    tok = tmp_path / "tok"
    tok.mkdir()
    for f in gz.tok("llama-spm-json").iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    tj = json.loads((tok / "tokenizer.json").read_text())
    tj["normalizer"]["normalizers"].insert(0, {"type": "NFKC"})
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BridgeError, match=r'normalizer \{"type": "NFKC"\} has no llama.cpp representation'):
        read_vocab(tok, 32000, "llama")


def test_arch_table_is_llama_cpps():
    """llama_cpp_archs.json is what scripts/derive_gguf_archs.py reads from the pinned llama.cpp (no drift), and
    every GGUF-exported type is written as the llama.cpp arch llama.cpp's converter gives its HF class."""
    import importlib.util

    from mlx_bridge.archs import get_arch
    from mlx_bridge.archs.registry import supported
    from mlx_bridge.testing.gguf import llama_cpp_sdist
    from mlx_bridge.translate.gguf.archs import GGUF_ARCHS, GGUF_REFUSED, LLAMA_CPP, refusal

    root = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location("derive_gguf_archs", root / "derive_gguf_archs.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    version, files = derive._read(llama_cpp_sdist(), derive._converter_file)
    assert (version, derive.parse_registrations(files)) == (LLAMA_CPP["llama_cpp"], LLAMA_CPP["hf_class"])
    table = {k.lower(): v for k, v in LLAMA_CPP["hf_class"].items()}
    wrong = {t: (ga.arch.name, table.get(get_arch({"model_type": t}).architecture.lower()))
             for t, ga in GGUF_ARCHS.items() if table.get(get_arch({"model_type": t}).architecture.lower()) != ga.arch.name}
    assert not wrong, f"written as another arch than llama.cpp converts them: {wrong}"
    assert set(GGUF_REFUSED) <= set(supported()) and not set(GGUF_REFUSED) & set(GGUF_ARCHS)
    from mlx_bridge.errors import BridgeError
    from mlx_bridge.translate.gguf.hparams import check_arch

    with pytest.raises(BridgeError, match="model_type 'phimoe' has no GGUF export: llama.cpp's phimoe routes experts"):
        check_arch("phimoe", {}, "config.json")  # llama.cpp computes it otherwise
    with pytest.raises(BridgeError, match="model_type 'llama4_text' has no GGUF export: mlx-lm's llama4_text"):
        check_arch("llama4_text", {}, "config.json")
    llama4 = GGUF_ARCHS["llama4"].text["llama4_text"]
    with pytest.raises(BridgeError, match="2 layers, none without rope, but llama.cpp's llama4 aborts"):
        check_arch("llama4_text", {"num_hidden_layers": 2, "use_qk_norm": True, "num_local_experts": 16}, "c", llama4)
    with pytest.raises(BridgeError, match="'moe' layers: llama.cpp converts this config as nemotron_h_moe"):
        check_arch("nemotron_h", {"layers_block_type": ["mamba", "moe", "attention"], "mlp_hidden_act": "relu2"}, "c")
    untested = set(GGUF_ARCHS) - {arch for arch, _ in CASES.values()}
    assert not untested, f"GGUF-exported without a llama.cpp-vs-transformers case: {sorted(untested)}"
    for t in set(supported()) - set(GGUF_ARCHS):
        assert refusal(t), t


def test_refused_where_llama_cpp_computes_otherwise():
    """One line each: an arch the gguf package does not know yet (llama.cpp's converter vendors a newer gguf-py),
    and configs llama.cpp's graph computes otherwise than MLX."""
    from mlx_bridge.errors import BridgeError
    from transformers import AutoConfig

    from mlx_bridge.archs.tiny import tiny_config
    from mlx_bridge.translate.gguf.hparams import arch_warnings, check_arch, gguf_config, text_arch

    for t in ("mellum", "laguna", "deepseek_v32"):
        if not hasattr(gguf.MODEL_ARCH, {"deepseek_v32": "DEEPSEEK32"}.get(t, t.upper())):
            with pytest.raises(BridgeError, match=f"model_type '{t}' has no GGUF export: .* an arch the gguf package"):
                check_arch(t, {}, "config.json")
    for t, over, needle in (("exaone_moe", dict(sliding_window_pattern=1), "no layer is windowed"),
                            ("ernie4_5_moe", dict(num_hidden_layers=3, moe_layer_end_index=1), "runs experts up to the last"),
                            ("afmoe", dict(mup_enabled=True), "ropes every layer but each 4th"),
                            ("glm_moe_dsa", dict(indexer_types=["full", "shared"]), "cannot write llama.cpp's indexer types"),
                            ("qwen3_vl", {}, r"M-RoPE sections \[2, 3, 3\] leave rotary pairs \[6\] \(of 8\)"),
                            ("afmoe", dict(num_hidden_layers=4, mup_enabled=False, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
                             "mup_enabled=False")):
        full = AutoConfig.for_model(t, **{**tiny_config(t), **over}).to_dict()  # as config.json states it
        model_type, cfg, ga = text_arch(t, full, "config.json")
        with pytest.raises(BridgeError, match=needle):
            check_arch(model_type, gguf_config(cfg), "config.json", ga)
    # real Qwen3-VL's sections leave two slow pairs to llama.cpp's 4th section: written, with one warning
    real = dict(text_config=dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20])))
    model_type, cfg, ga = text_arch("qwen3_vl", AutoConfig.for_model("qwen3_vl", **{**tiny_config("qwen3_vl"), **real}).to_dict(), "c")
    ga = check_arch(model_type, gguf_config(cfg), "config.json", ga)
    assert arch_warnings(gguf_config(cfg), ga) == [
        "M-RoPE sections [24, 20, 20] leave rotary pairs [61, 62] (of 64) unrotated on text in llama.cpp (as its own "
        "converter writes this model); MLX turns them by at most 4.1e-07 rad a token (0.014 rad at position 32768)"]
    with pytest.raises(BridgeError, match="llama.cpp's qwen2vl never reads the rms_norm_eps key"):
        check_arch("qwen2_5_vl", {}, "config.json")
    cfg = gguf_config({"model_type": "minicpm3", **tiny_config("minicpm3")})  # 256 positions over 128: scaled
    with pytest.raises(BridgeError, match="longrope scales q/k by 1.069 in MLX .* llama.cpp's minicpm3 does not"):
        check_arch("minicpm3", cfg, "config.json")


_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8)
_TEXT = dict(text_config=_SHAPE)  # a wrapper's language model
_TEXT_IMROPE = dict(text_config={**_SHAPE, **_IMROPE["text_config"]})
MORE_BYTES = {"apertus": {}, "glm": {}, "exaone_moe": dict(mlp_layer_types=["dense"] + ["sparse"] * 7),
              "ernie4_5_moe": dict(moe_layer_end_index=7), "afmoe": dict(layer_types=None, mup_enabled=True),
              "glm_moe_dsa": dict(mlp_layer_types=["dense"] + ["sparse"] * 7), "llava": _TEXT,
              "qwen3_vl": _TEXT_IMROPE, "qwen3_vl_moe": _TEXT_IMROPE}
MORE_BYTES.update({t: {k: v for k, v in OVERRIDES.get(t, {}).items() if k != "num_hidden_layers"} for t in (
    "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmoe", "granite", "granitemoe",
    "cohere", "starcoder2", "smollm3", "seed_oss", "ernie4_5", "hunyuan_v1_dense", "nemotron", "glm4", "phi",
    "stablelm", "gpt2", "gpt_bigcode", "glm4_moe", "dots1", "deepseek_v2", "glm4_moe_lite", "falcon_mamba", "ministral3")})

# fourth session (#15b): the types whose tiny configs needed more than the 256/8 shape, widened so that their
# K-quant rows are multiples of 256 (mixer outputs, experts) where the tiny has 16- or 32-wide ones
_EVERY_4TH = dict(layer_types=None)  # the config's own 8-layer pattern: full attention every 4th layer
_GDN = dict(linear_key_head_dim=64, linear_value_head_dim=64)  # the gated delta net's output 4 x 64 (llama.cpp: k = v)
_GDN_MOE = dict(_GDN, moe_intermediate_size=256, shared_expert_intermediate_size=256)
MORE_BYTES.update({
    "mistral": {}, "exaone": {}, "iquestcoder": {}, "mistral3": _TEXT,
    "internlm3": dict(head_dim=64), "cohere2": dict(head_dim=64),  # mlx-lm: head_dim = hidden / heads
    "gpt_neox": dict(intermediate_size=1024),  # mlx-lm's gpt_neox: 4 x hidden
    "olmo3": dict(layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2),
    "granitemoehybrid": dict(layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2),
    # windowed: llama.cpp windows exaone4 only with 64 layers (the export refuses others), and mlx-lm reads no
    # exaone4 without a window
    "exaone4": dict(num_hidden_layers=64, intermediate_size=256),
    "minicpm3": dict(max_position_embeddings=128, v_head_dim=64),  # mlx-lm: v_head_dim = hidden / heads
    "mamba2": dict(head_dim=64),  # 8 heads of 64: d_inner = 2 x hidden
    # no ffn_down in 5 of 8 layers, and no expert_count (llama.cpp counts ffn_down, not blk.N, without experts)
    "nemotron_h": dict(hybrid_override_pattern="M*-M*-M-", mamba_num_heads=8, mamba_head_dim=32),
    "qwen3_next": dict(rms_norm_eps=1e-6, **_EVERY_4TH, **_GDN_MOE),
    "gpt_oss": dict(intermediate_size=256),  # MXFP4 experts but in the 2 adapted layers (written f32)
    "gemma3": dict(text_config={**_SHAPE, **_EVERY_4TH}),
    "qwen3_5": dict(text_config={**_SHAPE, **_EVERY_4TH, **_GDN}),
    "qwen3_5_moe": dict(text_config={**_SHAPE, **_EVERY_4TH, **_GDN_MOE}),
    "llama4": dict(text_config={**_SHAPE, **OVERRIDES["llama4"]["text_config"], "intermediate_size_mlp": 512})})


@pytest.mark.slow
@pytest.mark.parametrize("arch", MORE_BYTES)
def test_quantized_bytes_more_types(gz, tmp_path, arch):
    """q4_k_m bytes equal `llama_model_quantize`'s for 57 more types (hidden 256, 8 layers: the mix's layer pattern,
    llama.cpp's per-arch rules on attn_v / ffn_down / expert tensors; GPT-2's learned positions kept F32)."""
    src = gz.mlx(arch, "llama-spm", **{**_SHAPE, **MORE_BYTES[arch]})
    if arch not in HF_BASE:  # (GgufZoo finds the HF checkpoint of a base only)
        src = gz.adapter(src)
    assert_bytes_equal(gz, src, tmp_path, "q4_k_m", hf_base=arch in HF_BASE)


def test_every_type_has_a_byte_test():
    """Each GGUF-exported type has a q4_k_m byte test against `llama_model_quantize`."""
    from mlx_bridge.translate.gguf.archs import GGUF_ARCHS

    untested = set(GGUF_ARCHS) - {a for a, _ in BYTES} - set(MORE_BYTES)
    assert not untested, f"GGUF-exported without a q4_k_m byte test: {sorted(untested)}"
