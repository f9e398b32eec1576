"""`export --format gguf`: an MLX model/adapter/checkpoint -> one GGUF file + an Ollama Modelfile.

The adapter is fused exactly as for `--format hf` (same plan, built at float32), then each tensor is
laid out for llama.cpp and quantized from float32 while streaming into the file; there is no
intermediate HF directory. Everything (arch, config, tokenizer, type) is checked before the first byte.

Example:
    >>> from mlx_bridge.translate.gguf import GGUF_TYPES
    >>> sorted(GGUF_TYPES)
    ['bf16', 'f16', 'f32', 'q4_0', 'q4_k_m', 'q5_k_m', 'q6_k', 'q8_0']
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...errors import BridgeError
from .. import hf_config
from ..plan import Plan, build_plan
from .types import GGUF_TYPES

__all__ = ["GGUF_TYPES", "GgufJob", "prepare_gguf", "check_gguf_type"]


def check_gguf_type(gguf_type: str) -> str:
    t = gguf_type.lower()
    if t not in GGUF_TYPES:
        raise BridgeError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    return t


@dataclass
class GgufJob:
    plan: Plan
    cfg: dict
    gguf_type: str
    name: str
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    _ga: object = None
    _vocab: object = None
    _tok: tempfile.TemporaryDirectory | None = None
    hashes: dict[Path, str] = field(default_factory=dict)  # of the .gguf files written, hashed while writing

    @property
    def filename(self) -> str:
        return f"model-{self.gguf_type}.gguf"

    def table(self) -> str:
        from .tensors import gguf_tensors
        from .write import tensor_types

        ts = gguf_tensors(self.plan, self._ga, self.cfg)
        types = tensor_types(ts, self._ga, self.cfg, self.gguf_type)
        rows = [f"{t.name}  {list(t.shape)}  {ty.name}  <- {t.describe()}" for t, ty in zip(ts, types)]
        rows.append(f"# {len(ts)} GGUF tensors, {self._ga.arch.name.lower()}, tokenizer {self._vocab.model}"
                    f" (pre {self._vocab.pre}), --gguf-type {self.gguf_type}")
        return "\n".join(rows)

    def write(self, out: Path, split_bytes: int = 0, progress: bool = True) -> list[Path]:
        from .modelfile import write_modelfile
        from .write import write_gguf

        bar = _bar(sum(4 * _n(i.shape) for i in self.plan.items), progress)
        tok = Path(self._tok.name)
        self.hashes = write_gguf(self.plan, self.cfg, self._ga, self._vocab, tok, out / self.filename, self.gguf_type,
                                 self.name, split_bytes, progress=bar.update)
        files = list(self.hashes)
        bar.close()
        eos = self.cfg.get("eos_token_id")
        gen = tok / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.notes.append(write_modelfile(out, files[0].name, tok, self._vocab.tokens, eos))
        return files

    def readme(self, files: list[Path], base: str, adapter: str | None) -> str:
        lines = [f"# {self.plan.arch.architecture} as GGUF, exported by mlx-bridge", "",
                 f"- base model: `{base}`", f"- adapter: `{adapter}` (fused in float32)" if adapter else "- adapter: none",
                 f"- type: {self.gguf_type} (llama.cpp file type {GGUF_TYPES[self.gguf_type][0].name}), "
                 f"architecture {self._ga.arch.name.lower()}, tokenizer {self._vocab.model} (pre {self._vocab.pre})",
                 f"- files: {', '.join(f.name for f in files)}", "",
                 f"Run with `llama-cli -m {files[0].name}`, or `ollama create NAME -f Modelfile`; LM Studio opens the file.", ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.warnings:
            lines += ["## Warnings", "", *[f"- {w}" for w in self.warnings], ""]
        return "\n".join(lines)

    def close(self) -> None:
        if self._tok is not None:
            self._tok.cleanup()


def _n(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="gguf", leave=False, disable=not enabled)


def prepare_gguf(source, gguf_type: str, name: str) -> GgufJob:
    """Validate SRC for a GGUF export (arch, config, tokenizer) and plan it; nothing is written to `out`."""
    from .archs import text_name
    from .vocab import read_vocab
    from .hparams import arch_warnings, check_arch, gguf_config, text_arch

    gguf_type = check_gguf_type(gguf_type)
    plan = build_plan(source, "float32", text_only=True)  # fuse in float32; quantize from float32
    cfg, notes = hf_config.effective_config(source.base.config, plan.arch, "float32")
    where = str(source.base.path / "config.json")
    model_type, cfg, ga = text_arch(plan.arch.model_type, cfg, where)
    cfg = gguf_config(cfg)
    ga = check_arch(model_type, cfg, where, ga)
    warnings = arch_warnings(cfg, ga)
    if model_type != plan.arch.model_type:  # the language model's tensors only (an mlx-vlm base keeps the vision tower)
        text = set(plan.arch.rules)  # mlx-lm's tensors: the language model (Qwen2-VL's names have no language_model.)
        plan = replace(plan, items=[i for i in plan.items if "language_model." in i.name or i.name == "lm_head.weight"
                                    or plan.arch.template(i.name)[0] in text])
        warnings.append(f"{plan.arch.model_type}: only the language model is written; llama.cpp reads the vision "
                        f"tower from a separate mmproj GGUF, which mlx-bridge does not write")
    tok = tempfile.TemporaryDirectory(prefix="mlx-bridge-tok-")
    try:
        tdir = Path(tok.name)
        hf_config.copy_tokenizer(source.base.path, tdir)
        if source.adapter is not None:
            hf_config.copy_tokenizer(source.path, tdir)
        if (source.base.path / "generation_config.json").is_file():
            shutil.copyfile(source.base.path / "generation_config.json", tdir / "generation_config.json")
        (tdir / "config.json").write_text(json.dumps(cfg))
        emb = next((i for i in plan.items if text_name(i.name) == "model.embed_tokens.weight"), None)
        n_vocab = emb.shape[0] if emb is not None else cfg["vocab_size"]
        vocab = read_vocab(tdir, n_vocab, model_type)
    except BaseException:
        tok.cleanup()
        raise
    warnings += vocab.warnings
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return GgufJob(plan, cfg, gguf_type, name, notes + vocab.notes, warnings, ga, vocab, tok)
