"""Regenerate mlx_bridge/archs/derived/*.json from the installed mlx-lm and transformers.

    python scripts/derive_archs.py            # every mlx-lm type with a transformers class
    python scripts/derive_archs.py glm4 phimoe   # just these
    python scripts/derive_archs.py --check    # exit 1 when the checked-in data differs
    python scripts/derive_archs.py --docs     # rewrite docs/architectures.md from the registry

Each type's rules come from mlx-lm's own loading of a tiny transformers checkpoint (see
mlx_bridge/archs/derive.py). A type whose rules cannot be derived is written with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_bridge.archs import DERIVED_DIR, DOCS  # noqa: E402
from mlx_bridge.archs.derive import Refused, derive, hf_classes, mlx_lm_types  # noqa: E402


def one(model_type: str) -> dict:
    try:
        return derive(model_type)
    except Refused as e:
        return {"model_type": model_type, **hf_classes(model_type), "refused": str(e)}


def text(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*")
    ap.add_argument("--check", action="store_true", help="compare with the checked-in files, write nothing")
    ap.add_argument("--docs", action="store_true", help="write docs/architectures.md from the registry and stop")
    args = ap.parse_args(argv)
    if args.docs:
        from mlx_bridge.archs.docs import render

        (ROOT / DOCS).write_text(render())
        print(f"wrote {DOCS}")
        return 0
    types = args.types or [t for t, _ in mlx_lm_types() if hf_classes(t)["hf_class"]]
    diffs = []
    for t in types:
        data = one(t)
        path = DERIVED_DIR / f"{t}.json"
        status = "refused: " + data["refused"] if "refused" in data else f"{len(data['hf'])} HF tensors"
        if args.check:
            if not path.exists() or path.read_text() != text(data):
                diffs.append(t)
                print(f"{t}: differs from {path.relative_to(ROOT)} ({status})")
            continue
        path.write_text(text(data))
        print(f"{t}: {status}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
