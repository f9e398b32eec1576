"""Issue 13: probes that can see what configs get wrong. A model with a sliding window (or a rope
scaling past a threshold) gets one long probe past it at save time; `verify` compares its last
positions and says so; short probes alone pass an export whose window is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_bridge.probes import Probes
from mlx_bridge.testing.adapters import probe_ids
from mlx_bridge.train.golden import LONG_TAIL, compute_probes, long_probe_length
from mlx_bridge.verify import verify
from test_export_common import zoo  # noqa: F401


def test_long_probe_length_from_window_and_rope_scaling():
    assert long_probe_length({"sliding_window": 8}) == 8 + LONG_TAIL
    assert long_probe_length({"sliding_window": 0, "rope_scaling": None}) is None
    assert long_probe_length({"max_position_embeddings": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}}) == 64 + LONG_TAIL
    assert long_probe_length({"rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 32},
                              "sliding_window": 16}) == 32 + LONG_TAIL


def test_a_wrong_sliding_window_is_caught_only_by_the_long_probe(zoo, tmp_path):
    from mlx_lm import load as mlx_load

    from mlx_bridge import export

    base = zoo.mlx("gemma3_text", sliding_window=8)
    model, _ = mlx_load(str(base))
    ids = probe_ids(json.loads((base / "config.json").read_text())["vocab_size"], n=2, length=6)  # inside the window
    probes = compute_probes(model, ids, max_new_tokens=2)
    assert probes.long_input_ids.shape == (1, 8 + LONG_TAIL) and probes.long_logits.shape[:2] == (1, LONG_TAIL)
    out = export(base, tmp_path / "e", verify=False, progress=False, log=lambda *a: None)
    probes.save(out)
    back = Probes.load(out)
    np.testing.assert_array_equal(back.long_input_ids, probes.long_input_ids)

    report = verify(out, write=False)
    assert report["passed"] and report["long_probe"]["length"] == 16, report["summary"]
    assert "tolerance" in report and "limit" in report["summary"]

    cfg = json.loads((out / "config.json").read_text())
    cfg["sliding_window"] = 64  # the window MLX did not compute with
    (out / "config.json").write_text(json.dumps(cfg))
    report = verify(out, write=False)
    assert report["logits"]["passed"] and report["greedy"]["passed"], "short probes cannot see the window"
    assert not report["long_probe"]["passed"] and not report["passed"], report["summary"]
