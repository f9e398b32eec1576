"""Shared pieces of the export tests (issue 2): the session zoo of tiny models, HF-side loading and the
comparison helpers. Imported by the other `test_export_*.py` modules; holds no tests itself.

The zoo lives under pytest's base temp dir, so every module of one session shares what was built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mlx_bridge.formats import SafetensorsFile
from mlx_bridge.testing.adapters import Zoo, probe_ids, shared_zoo

DENSE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]
ARCHS = DENSE + MOE
ATOL = 1e-4  # float32 rounding over 2 layers of hidden 64 (observed differences are ~2e-6)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def run_export(src, out, **kw) -> Path:
    """The Python API under test."""
    from mlx_bridge import export

    return Path(export(str(src), str(out), **kw))


def ids_for(d: Path) -> np.ndarray:
    return probe_ids(json.loads((Path(d) / "config.json").read_text())["vocab_size"])


def assert_close(got: np.ndarray, want: np.ndarray, atol: float = ATOL, what: str = "") -> None:
    """Fail with the max and mean absolute difference (and where the max is) when they disagree."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    d = np.abs(got - want)
    if not d.max() <= atol:
        at = np.unravel_index(int(d.argmax()), d.shape)
        pytest.fail(f"{what}: max |diff| {d.max():.3e} at {at} (got {got[at]:.6g}, want {want[at]:.6g}), "
                    f"mean {d.mean():.3e}, {int((d > atol).sum())}/{d.size} over {atol:g}")


def load_hf(d: Path, dtype: str = "float32"):
    """`AutoModelForCausalLM.from_pretrained(d)` that fails on any missing/unexpected/mismatched key."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=getattr(torch, dtype), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: loading info not clean: {bad}"
    return model.eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def read_tensors(d: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of a model dir: name -> (safetensors dtype, shape, raw bytes)."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        if f.name in ("probes.safetensors",):
            continue
        with SafetensorsFile(f) as st:
            for k in st.keys():
                t = st.info(k)
                out[k] = (t.dtype, t.shape, bytes(st.raw(k)))
    return out


def as_array(t: tuple[str, tuple, bytes]) -> np.ndarray:
    from mlx_bridge.formats import DTYPES

    dt, shape, raw = t
    return np.frombuffer(raw, dtype=DTYPES[dt].np).reshape(shape)


_MIXTRAL_W = {"1": "gate", "2": "down", "3": "up"}
# HF name -> (MLX name, expert index): the test's own statement of how mlx-lm stacks experts (FORMATS.md §4).
_MOE_HF = [
    (re.compile(r"(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.w([123])\.weight$"),
     lambda m: (f"{m[1]}.switch_mlp.{_MIXTRAL_W[m[3]]}_proj.weight", int(m[2]))),
    (re.compile(r"(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"),
     lambda m: (f"{m[1]}.switch_mlp.{m[3]}_proj.weight", int(m[2]))),
]


def mlx_source_of(hf_name: str) -> tuple[str, int | None]:
    """Which MLX tensor (and expert slice) an exported HF tensor comes from."""
    for rx, f in _MOE_HF:
        m = rx.match(hf_name)
        if m:
            return f(m)
    return hf_name, None


def hf_config(d: Path) -> dict:
    return json.loads((Path(d) / "config.json").read_text())


def exported(src: Path, **kw) -> Path:
    """Export `src` once per set of options; the result sits beside it (shared by the whole session)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    out = Path(f"{src}-exp" + (f"-{tag}" if tag else ""))
    if not out.exists():
        run_export(src, out, **kw)
    return out


def adapter_targets(adapter: Path) -> set[str]:
    """MLX tensor names an adapter changes (`X.weight` for each `X.lora_a`/`lora_b`/`m`; full: its own keys)."""
    with SafetensorsFile(Path(adapter) / "adapters.safetensors") as f:
        keys = f.keys()
    out = set()
    for k in keys:
        mod, leaf = k.rsplit(".", 1)
        out.add(f"{mod}.weight" if leaf in ("lora_a", "lora_b", "m") else k)
    return out


def check_copied(out: Path, base: Path, touched: set[str] = frozenset()) -> set[str]:
    """Every exported tensor whose MLX source is not in `touched` equals the source bytes (the expert's
    slice for MoE).

    Returns the MLX tensor names that were found as sources.
    """
    src, dst = read_tensors(base), read_tensors(out)
    used, problems = set(), []
    for name, t in dst.items():
        sname, e = mlx_source_of(name)
        used.add(sname)
        if sname in touched:
            continue
        if sname not in src:
            problems.append(f"{name}: no source tensor {sname}")
            continue
        s = src[sname]
        if e is not None:
            arr = as_array(s)[e]
            s = (s[0], arr.shape, arr.tobytes())
        if s[:2] != t[:2]:
            problems.append(f"{name}: {t[0]}{t[1]} != source {sname} {s[0]}{s[1]}")
        elif s[2] != t[2]:
            problems.append(f"{name}: bytes differ from source {sname}")
    assert not problems, f"{len(problems)} problems: " + "; ".join(problems[:10])
    return used
