"""Regenerate mlx_bridge/translate/gguf/pre_tokenizers.json from llama.cpp's own sources.

llama.cpp names a BPE pre-tokenizer (`tokenizer.ggml.pre`) in two places: convert_hf_to_gguf's
`get_vocab_base_pre` (sha256 of the token ids of a fixed text -> name) and src/llama-vocab.cpp (name ->
pre-tokenizer type -> the regexes it splits with). This script reads both from a llama.cpp tree or the
llama-cpp-python sdist (which vendors it) and writes the table the exporter uses:
{"llama_cpp": version, "chktxt": ..., "chkhsh": {hash: name}, "regex": {name: [regex, ...]}}.

    python scripts/derive_gguf_vocab.py path/to/llama_cpp_python-X.tar.gz   # or a llama.cpp checkout
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mlx_bridge" / "translate" / "gguf" / "pre_tokenizers.json"
CONVERT = ("conversion/base.py", "convert_hf_to_gguf.py")  # get_vocab_base_pre moved to conversion/ in 2026
VOCAB = "src/llama-vocab.cpp"


def _read(src: Path, want=lambda rel: rel in (*CONVERT, VOCAB)) -> tuple[str, dict[str, str]]:
    """(version, {relative path: text}) of the llama.cpp files `want`ed, from a tarball or a directory."""
    files: dict[str, str] = {}
    if src.is_file():
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                rel = m.name.split("vendor/llama.cpp/", 1)[-1]
                if "vendor/llama.cpp/" in m.name and m.isfile() and want(rel):
                    files[rel] = tar.extractfile(m).read().decode()
        version = re.search(r"llama_cpp_python-([\w.]+)\.tar", src.name)
        return (version.group(1) if version else src.name), files
    for path in src.rglob("*.py" if not want(VOCAB) else "*"):
        rel = path.relative_to(src).as_posix()
        if path.is_file() and want(rel):
            files[rel] = path.read_text()
    return src.name, files


def _c_string(lit: str) -> str:
    return ast.literal_eval('"' + lit + '"')


def parse_chkhsh(text: str) -> tuple[str, dict[str, str]]:
    chktxt = ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", text, re.M).group(1))
    table = dict(re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#.*\n)*\s*res = "([^"]+)"', text))
    return chktxt, table


def parse_regexes(text: str) -> dict[str, list[str]]:
    """name -> regexes llama.cpp splits with (the active ones, then the tokenizer.json originals)."""
    by_type: dict[str, list[str]] = {}
    cases: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        m = re.match(r"\s*case (LLAMA_VOCAB_PRE_TYPE_\w+):", line)
        if m:
            cases.append(m.group(1))
            continue
        if "regex_exprs = {" in line and cases:
            active, original = [], []
            for body in lines:
                if body.strip().startswith("};"):
                    break
                s = body.strip()
                lits = re.findall(r'"((?:[^"\\]|\\.)*)"', s)
                (original if s.startswith("//") else active).extend(_c_string(x) for x in lits)
            for c in cases:
                by_type[c] = active + [o for o in original if o not in active]
            continue
        if re.match(r"\s*(break;|default:)", line):
            cases = []
    names: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in text.splitlines():
        pending += re.findall(r'tokenizer_pre == "([^"]+)"', line)
        m = re.search(r"pre_type\s*=\s*(LLAMA_VOCAB_PRE_TYPE_\w+);", line)
        if m and pending:
            for n in pending:
                if m.group(1) in by_type:
                    names[n] = by_type[m.group(1)]
            pending = []
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    version, files = _read(Path(argv[0]))
    convert = next((files[p] for p in CONVERT if p in files and "def get_vocab_base_pre" in files[p]), None)
    if convert is None or VOCAB not in files:
        print(f"{argv[0]}: no get_vocab_base_pre / {VOCAB} found", file=sys.stderr)
        return 2
    chktxt, chkhsh = parse_chkhsh(convert)
    regex = parse_regexes(files[VOCAB])
    # regex names keep llama-vocab.cpp's order: among aliases of one pre-tokenizer type the first is canonical
    OUT.write_text(json.dumps({"chkhsh": dict(sorted(chkhsh.items())), "chktxt": chktxt, "llama_cpp": version,
                               "regex": regex}, indent=1, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(chkhsh)} hashes, {len(regex)} pre-tokenizer names (llama.cpp of {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
