"""Regenerate mlx_bridge/translate/gguf/plain_configs.json from the installed transformers: the GGUF-exported
model types whose config class only renames keys (their `attribute_map`), which `gguf_config` then resolves
without importing transformers (translate/gguf/plain_configs.py). tests/test_gguf_stream.py fails on drift.

    python scripts/derive_gguf_configs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_bridge.translate.gguf.plain_configs import DATA, derive, model_types  # noqa: E402


def main() -> int:
    data = derive(model_types())
    DATA.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{DATA}: {len(data['plain'])} model types resolve without transformers {data['transformers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
