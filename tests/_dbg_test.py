import sys, numpy as np
sys.path.insert(0, "tests")
import pytest
from mlx_bridge.archs import get_arch
from mlx_bridge.testing.adapters import probe_ids
from test_export_registry import load, torch_logits
from test_export_common import exported, hf_config, zoo  # noqa
import test_export_common as tec

def test_dbg(zoo):
    t = sys_t = __import__("os").environ["T"]
    kw = eval(__import__("os").environ.get("KW", "{}"))
    arch = get_arch({"model_type": t})
    base = zoo.mlx(t, **kw)
    cfg = hf_config(base)
    ids = probe_ids((cfg.get("text_config") or cfg)["vocab_size"], n=1, length=24, seed=3)
    out = exported(base)
    import json; print({k: v for k, v in json.load(open(out / "config.json")).items() if k not in ("id2label",)})
    a = torch_logits(load(out, arch), ids); b = zoo.logits(base, ids=ids)
    print("per-pos maxdiff", np.abs(a - b).max(-1).round(4))
