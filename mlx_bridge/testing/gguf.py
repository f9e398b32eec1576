"""Real vocabularies for GGUF tests: llama.cpp's `models/ggml-vocab-*.gguf`, from the llama-cpp-python sdist.

The sdist vendors llama.cpp, whose models/ directory has vocabulary-only GGUF files (llama 3, qwen2,
gpt-2, llama 2 SentencePiece, ...) with tokenizer test inputs (`.inp`) and expected ids (`.out`).
`vocab_file` extracts one (the sdist is the installed llama-cpp-python's version, downloaded once by
pip into the cache, or named by MLX_BRIDGE_LLAMA_CPP_SDIST); `hf_tokenizer` turns it back into
Hugging Face tokenizer files, so a tiny model can carry a real tokenizer through MLX and export.

Example:
    >>> tok_dir = hf_tokenizer(vocab_file("llama-bpe"), "/tmp/tok-llama3")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from .adapters import make_adapter, mlx_convert
from .models import tiny_hf_model

CACHE = Path(os.environ.get("MLX_BRIDGE_CACHE", Path.home() / ".cache" / "mlx-bridge"))
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python source tarball of the installed version (pip-downloaded once into CACHE)."""
    env = os.environ.get("MLX_BRIDGE_LLAMA_CPP_SDIST")
    if env:
        return Path(env)
    version = metadata.version("llama-cpp-python")
    path = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(CACHE)], check=True)
    return path


def vocab_file(name: str) -> Path:
    """models/ggml-vocab-{name}.gguf (and its .inp/.out when present), extracted once into CACHE."""
    out = CACHE / "vocab" / f"ggml-vocab-{name}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(llama_cpp_sdist()) as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if "/vendor/llama.cpp/models/" in m.name and base.startswith(out.name):
                    (out.parent / base).write_bytes(tar.extractfile(m).read())
    return out


def vocab_tests(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for a vocab file: (text, expected ids without BOS)."""
    sep = "\n__ggml_vocab_test__\n"
    inp = Path(f"{vocab}.inp").read_text(encoding="utf-8").split(sep)
    out = Path(f"{vocab}.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(inp, out)]


class GgufZoo:
    """Tiny models with real vocabularies, their adapters and exports, built once each under `root`."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def tok(self, vocab: str) -> Path:
        """HF tokenizer files of llama.cpp's vocab `vocab`; "<name>-json": a SentencePiece vocab as
        tokenizer.json alone (no tokenizer.model)."""
        d = self.root / f"tok-{vocab}"
        if not (d / "tokenizer_config.json").exists():
            if vocab.endswith("-json"):
                spm_json_tokenizer(self.tok(vocab.removesuffix("-json")), d)
            else:
                hf_tokenizer(vocab_file(vocab), d)
        return d

    def mlx(self, arch: str, vocab: str = "llama-bpe", **overrides) -> Path:
        tag = re.sub(r"[^\w.=+-]", "", "-".join([arch, vocab] + [f"{k}{v}" for k, v in sorted(overrides.items())]))
        if len(tag) > 120:  # a name is at most 255 bytes, with the export's suffixes and temp-dir tail
            tag = f"{arch}-{vocab}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"
        d = self.root / f"mlx-{tag}"
        if not (d / "config.json").exists():
            hf = self.root / f"hf-{tag}"
            from ..archs.registry import describe

            tiny_hf_model(hf, arch, tokenizer_dir=self.tok(vocab), mxfp4=describe(arch).quirks.hub_mxfp4, **overrides)
            mlx_convert(hf, d, dtype="float32")
            if (self.tok(vocab) / "tokenizer.model").is_file():  # as hub MLX models of SentencePiece families ship it
                (d / "tokenizer.model").write_bytes((self.tok(vocab) / "tokenizer.model").read_bytes())
        return d

    def adapter(self, base: Path) -> Path:
        d = Path(f"{base}-lora")
        if not (d / "adapters.safetensors").exists():
            make_adapter(base, d, rank=4, num_layers=2)
        return d

    def export(self, src: Path, fmt: str, gguf_type: str | None = None, hf_base: bool = False) -> Path:
        """`hf_base`: pass the HF checkpoint `mlx` converted (what mlx-lm drops, e.g. a vision tower, comes from it)."""
        out = Path(f"{src}-{fmt}{'-' + gguf_type if gguf_type else ''}")
        if not out.exists():
            from mlx_bridge import export

            kw = {"gguf_type": gguf_type} if fmt == "gguf" else {"dtype": "float32", "verify": False}
            if hf_base:
                kw["hf_base"] = str(src.with_name(src.name.replace("mlx-", "hf-", 1)))
            export(str(src), str(out), format=fmt, progress=False, log=lambda *a: None, **kw)
        return out


def _fields(vocab: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(vocab)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


def hf_tokenizer(vocab: Path, out: str | os.PathLike, chat_template: str | None = LLAMA3_TEMPLATE) -> Path:
    """Hugging Face tokenizer files for a llama.cpp vocab GGUF (byte-level BPE -> tokenizer.json,
    SentencePiece -> tokenizer.model); returns `out`."""
    f = _fields(vocab)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    cfg = {"bos_token": tokens[bos] if bos is not None else None, "eos_token": tokens[eos] if eos is not None else None,
           "chat_template": chat_template, "clean_up_tokenization_spaces": False}
    if f["tokenizer.ggml.model"] == "gpt2":
        _bpe_json(f, out, tokens, types, bos)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        _spm_model(f, out, tokens, types)
        cfg.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=True,
                   unk_token=tokens[0])
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    return out


def _bpe_json(f: dict, out: Path, tokens: list[str], types: list[int], bos: int | None) -> None:
    from mlx_bridge.translate.gguf.vocab import PRE

    pre = f.get("tokenizer.ggml.pre", "gpt-2")
    regexes = PRE["regex"][pre]
    split = regexes[-1]  # the tokenizer.json original where llama.cpp keeps one
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None if bos is None or pre != "llama-bpe" else {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe",
                  "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                            if ty != 3 and not (ty == 4 and re.fullmatch(r"\[PAD\d+\]", t))},  # GGUF padding
                  "merges": list(f["tokenizer.ggml.merges"])},
    }
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))


def _spm_model(f: dict, out: Path, tokens: list[str], types: list[int]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len([t for t in tokens if not re.fullmatch(r"\[PAD\d+\]", t)])
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    n = len(tokens)
    while n and re.fullmatch(r"\[PAD\d+\]", tokens[n - 1]):  # GGUF padding is no SentencePiece piece
        n -= 1
    for t, s, ty in zip(tokens[:n], f["tokenizer.ggml.scores"], types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, kinds[ty]
    (out / "tokenizer.model").write_bytes(m.SerializeToString())


def spm_json_tokenizer(spm_dir: Path, out: Path) -> Path:
    """tokenizer.json (and tokenizer_config.json) for the tokenizer.model in `spm_dir`, as transformers'
    own `SpmConverter.build_tokenizer_from_spm_proto` builds it (encodes like SentencePiece); no tokenizer.model."""

    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.convert_slow_tokenizer import SpmConverter

    m = pb.ModelProto()
    m.ParseFromString((spm_dir / "tokenizer.model").read_bytes())
    tk = SpmConverter.build_tokenizer_from_spm_proto(m, {p.piece: i for i, p in enumerate(m.pieces)})
    tk.add_special_tokens([p.piece for p in m.pieces if p.type in (2, 3)])  # unknown, control: added tokens as on the hub
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    cfg = json.loads((spm_dir / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    return out
