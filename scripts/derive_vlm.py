"""Regenerate mlx_bridge/archs/mlx_vlm.json from the installed mlx-vlm and transformers.

    python scripts/derive_vlm.py            # every multimodal wrapper the registry exports
    python scripts/derive_vlm.py --check    # exit 1 when the checked-in data differs

Each type's rules come from mlx-vlm's own loading of a tiny transformers checkpoint (see
mlx_bridge/archs/derive_vlm.py): where each tensor mlx-lm drops lands in an mlx-vlm conversion. A type
mlx-vlm cannot convert is written with its reason (its mlx-vlm bases are refused by name).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_bridge.archs.registry import VLM_RULES  # noqa: E402
from mlx_bridge.archs.derive import Refused  # noqa: E402
from mlx_bridge.archs.derive_vlm import derive_vlm, types as vlm_types  # noqa: E402

PATH = VLM_RULES


def build() -> str:
    types = {}
    for t in vlm_types():
        try:
            types[t] = {"rules": derive_vlm(t)}
        except Refused as e:
            types[t] = {"refused": str(e)}
    data = {"mlx_vlm": version("mlx-vlm"), "transformers": version("transformers"), "types": types}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the checked-in file, write nothing")
    args = ap.parse_args(argv)
    new = build()
    if args.check:
        if not PATH.exists() or PATH.read_text() != new:
            print(f"{PATH.relative_to(ROOT)} differs from what mlx-vlm {version('mlx-vlm')} gives")
            return 1
        return 0
    PATH.write_text(new)
    for t, d in json.loads(new)["types"].items():
        print(f"{t}: {len(d['rules'])} tensors" if "rules" in d else f"{t}: refused: {d['refused']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
