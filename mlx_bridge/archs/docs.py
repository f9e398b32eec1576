"""docs/architectures.md, generated from the registry (`python scripts/derive_archs.py --docs`).

Per model type: the HF class, whether `--format hf` and `--format peft` export it, the native deploy
class (deploy/native/config.py's parsers), and the names vLLM and TensorRT-LLM run it under; then
every mlx-lm type with a transformers class that is refused, with the reason.

Example:
    >>> "| llama |" in render()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json

from .engines import TRTLLM_ARCHITECTURES, VLLM_ARCHITECTURES
from .registry import DERIVED_DIR, VLM_RULES, get_arch, refused, supported


def _native() -> set[str]:
    from ..deploy.native.config import PARSERS  # names only; the parsers stay in deploy/

    return set(PARSERS)


def peft_column(model_type: str) -> str:
    arch = get_arch({"model_type": model_type})
    odd = sorted(t.rsplit(".", 2)[-2] for t in arch.rules if not arch.plain(t) and any(
        p["mlx"].rsplit(".", 1)[0] in arch.linears for p in arch.rules[t]["parts"]))  # adapters PEFT can't state
    odd += [m.rsplit(".", 1)[-1] for m in arch.peft_refuses if any(  # modules PEFT's LoRA can't wrap
        p["mlx"].rsplit(".", 1)[0] in arch.linears for t in arch.rules if t.rsplit(".", 1)[0] == m
        for p in arch.rules[t]["parts"])]
    odd += [m.rsplit(".", 1)[-1] for m, why in arch.peft_misloads.items() if not why.startswith("with siblings")]
    return "yes" if not odd else f"yes, except on {', '.join(sorted(set(odd)))} (hf only)"


def _gguf() -> tuple[dict[str, str], callable]:
    from ..translate.gguf.archs import GGUF_ARCHS, refusal  # needs the gguf extra

    return {t: gguf_arch(ga) for t, ga in GGUF_ARCHS.items()}, refusal


def gguf_arch(ga) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[ga.arch]


def render() -> str:
    native = _native()
    gguf_types, gguf_refusal = _gguf()
    types, ref = supported(), refused()
    total = len(list(DERIVED_DIR.glob("*.json")))
    versions = {json.loads(p.read_text()).get("mlx_lm") for p in DERIVED_DIR.glob("*.json")} - {None}
    lines = [
        "# Architectures", "",
        "Generated from the registry (`mlx_bridge/archs`) by `python scripts/derive_archs.py --docs`; do not edit.",
        f"The key rules are derived from mlx-lm {', '.join(sorted(versions))} itself (`scripts/derive_archs.py`).", "",
        f"**{len(types)} of the {total} mlx-lm model types that have a transformers causal-LM or "
        "image-text-to-text class export** (`--format hf`; `--format peft` where PEFT can express the adapter).", "",
        "Each exportable type has a parity test (`tests/test_export_registry.py` for those not covered by the older "
        "`test_export_parity.py` / `test_export_archs.py`): a tiny random transformers model (2 layers, hidden 64) "
        "converted by `mlx_lm.convert`, a LoRA on every linear, exported, and transformers' float32 logits within "
        "1e-3 relative of MLX's. Types whose checkpoints hold tensors mlx-lm drops (vision towers of multimodal "
        "checkpoints, an unused routing bias) need `--hf-base DIR`, the Hugging Face checkpoint the MLX base was "
        "converted from; those tensors are copied from it (or written as the zeros MLX computed with).", "",
        "PEFT: `--format peft` writes the adapter when every adapted weight is one MLX tensor renamed (or one expert "
        "of it) and PEFT's LoRA can wrap its transformers module; PEFT's own loading is run in the tests for llama, "
        "qwen2, phi3, mixtral, qwen3_moe (`test_export_peft.py`) and smollm3, glm4, cohere2, lfm2, apertus, "
        "minimax_m2, gpt_oss (attention) (`test_export_registry.py`), not yet for the others.", "",
        "Native deploy class: `mlx_bridge.load` builds the package's own module; otherwise it runs transformers' class. "
        "For every exportable type, a LoRA checkpoint of its tiny model exports, loads with `mlx_bridge.load` and "
        "passes `verify` against its MLX probes (`test_export_registry.py::test_load_and_verify`). "
        "vLLM: the architecture name vLLM runs natively, or its Transformers backend.", "",
        f"GGUF (`--format gguf`): the llama.cpp architecture the file is written as ({len(gguf_types)} types), each "
        "loaded by llama.cpp itself in `tests/test_export_gguf.py` and its logits compared with transformers', and "
        "each one's `q4_k_m` file equal, tensor types and bytes, to what llama.cpp's `llama_model_quantize` makes of "
        "its f32 file (hidden 256, so that K-quant rows fill 256-blocks; gpt-oss's MXFP4 experts, which llama.cpp's "
        "quantizer refuses to requantize, kept on both sides); the others are refused by name (reasons below).", "",
        "| model_type | HF class | hf | peft | native deploy class | vLLM | TensorRT-LLM | GGUF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in types:
        a = get_arch({"model_type": t})
        vllm = a.architecture if a.architecture in VLLM_ARCHITECTURES else f"{a.architecture} (Transformers backend)"
        trt = a.architecture if a.architecture in TRTLLM_ARCHITECTURES else "-"
        lines.append(f"| {t} | {a.architecture} | yes | {peft_column(t)} | {'yes' if t in native else 'transformers'}"
                     f" | {vllm} | {trt} | {gguf_types.get(t, '-')} |")
    lines += ["", f"## Refused ({len(ref)})", "",
              "Each is refused by name by `mlx-bridge export` (one line, exit 2, nothing written).", "",
              "| model_type | reason |", "|---|---|"]
    lines += [f"| {t} | {r.replace('|', '/')} |" for t, r in ref.items()]
    lines += _mlx_vlm_section()
    no_gguf = [t for t in types if t not in gguf_types]
    lines += ["", f"## No GGUF export ({len(no_gguf)} of the exportable types)", "",
              "`--format gguf` refuses these by name (one line, exit 2, nothing written); llama.cpp's converter "
              "registrations are read from the llama.cpp the tests run (`scripts/derive_gguf_archs.py`).", "",
              "| model_type | reason |", "|---|---|"]
    lines += [f"| {t} | {gguf_refusal(t).replace('|', '/')} |" for t in no_gguf]
    return "\n".join(lines) + "\n"


def _mlx_vlm_section() -> list[str]:
    """Which multimodal bases converted by mlx-vlm export without `--hf-base` (from archs/mlx_vlm.json)."""
    data = json.loads(VLM_RULES.read_text())
    ok = [t for t, d in data["types"].items() if "rules" in d]
    out = ["", f"## Bases converted by mlx-vlm ({len(ok)} of {len(data['types'])} multimodal types)", "",
           f"A base written by `mlx_vlm.convert` keeps its vision tower and projector under mlx-vlm's names and "
           f"layouts. For these types the export maps them back to transformers' names (and undoes mlx-vlm's conv "
           f"transposes) with rules derived from mlx-vlm {data['mlx_vlm']} itself (`scripts/derive_vlm.py`), so no "
           f"`--hf-base` is needed and the export stays multimodal: {', '.join(ok)}. Tested in "
           f"`tests/test_export_vlm.py` (mlx-vlm base, LoRA, transformers' logits within 1e-3 of MLX's, vision "
           f"tensors byte-equal to the HF original). The others: convert with `mlx_lm.convert` and pass `--hf-base`.",
           "", "| model_type | why mlx-vlm's layout is not derived |", "|---|---|"]
    return out + [f"| {t} | {d['refused'].replace('|', '/')} |" for t, d in data["types"].items() if "refused" in d]
