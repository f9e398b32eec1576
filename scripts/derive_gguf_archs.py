"""Regenerate mlx_bridge/translate/gguf/llama_cpp_archs.json: which HF class llama.cpp converts as which arch.

llama.cpp's converter (convert_hf_to_gguf.py, split into conversion/*.py in 2026) registers each model
class under the Hugging Face architecture names it converts (`@ModelBase.register("LlamaForCausalLM", ...)`)
and names its llama.cpp architecture (`model_arch = gguf.MODEL_ARCH.LLAMA`, inherited from a base class
when not set). This script reads both from the llama-cpp-python sdist (the llama.cpp the tests run) and
writes {"llama_cpp": version, "hf_class": {HF class: MODEL_ARCH name}}; the GGUF export refuses, by
that table's word, each registry type llama.cpp cannot convert (translate/gguf/archs.py `refusal`).

    python scripts/derive_gguf_archs.py path/to/llama_cpp_python-X.tar.gz   # or a llama.cpp checkout
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from derive_gguf_vocab import _read  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "mlx_bridge" / "translate" / "gguf" / "llama_cpp_archs.json"


def _converter_file(rel: str) -> bool:
    return rel == "convert_hf_to_gguf.py" or (rel.startswith("conversion/") and rel.endswith(".py"))


def parse_registrations(files: dict[str, str]) -> dict[str, str]:
    """{HF architecture name: MODEL_ARCH name} over every converter class (mmproj-only classes left out)."""
    classes: dict[str, tuple[list[str], str | None, list[str]]] = {}
    for text in files.values():
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            names = [a.value for d in node.decorator_list if isinstance(d, ast.Call)
                     and getattr(d.func, "attr", "") == "register" for a in d.args if isinstance(a, ast.Constant)]
            arch = next((s.value.attr for s in node.body if isinstance(s, (ast.Assign, ast.AnnAssign))
                         and getattr(s.targets[0] if isinstance(s, ast.Assign) else s.target, "id", "") == "model_arch"
                         and isinstance(s.value, ast.Attribute)), None)
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            classes[node.name] = (names, arch, bases)

    def arch_of(name: str, seen=()) -> str | None:
        if name not in classes or name in seen:
            return None
        _, arch, bases = classes[name]
        return arch or next((a for b in bases if (a := arch_of(b, (*seen, name)))), None)

    out: dict[str, str] = {}
    for name, (hf_names, _, _) in classes.items():
        arch = arch_of(name)
        for hf in hf_names:
            if arch and arch != "MMPROJ":  # a vision tower's converter, not the language model's
                out[hf] = arch
    return dict(sorted(out.items()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    version, files = _read(Path(argv[0]), _converter_file)
    table = parse_registrations(files)
    if not table:
        print(f"{argv[0]}: no converter registrations found", file=sys.stderr)
        return 2
    OUT.write_text(json.dumps({"hf_class": table, "llama_cpp": version}, indent=1) + "\n")
    print(f"{OUT}: {len(table)} HF classes (llama.cpp of {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
