"""Hub checkpoint layouts that `save_pretrained` does not write: gpt_oss's MXFP4 experts, and the
transposed experts transformers reads with a shape check (qwen3_vl_moe, `to_hub_transposed`).

openai/gpt-oss-* ship their experts as MXFP4 (`quantization_config.quant_method == "mxfp4"`), and that
is the only layout mlx-lm's gpt_oss `sanitize` reads. For each stacked expert parameter P of shape
(E, in, out) (`experts.gate_up_proj`, `experts.down_proj`) the checkpoint holds

    P_blocks  uint8 (E, out, in/32, 16)   two E2M1 codes a byte, low nibble first, along `in`
    P_scales  uint8 (E, out, in/32)       E8M0 exponent + 127 per group of 32 along `in`

which is what transformers' `integrations/mxfp4._convert_moe_packed_tensors` reads back (and
transposes to (E, in, out)); the tests load what `to_mxfp4_hub` writes with transformers and with
mlx-lm and compare. Values already on the MXFP4 grid are stored exactly; others are rounded to nearest.

Example:
    >>> import numpy as np
    >>> b, s = mxfp4_pack(np.array([[[0.5], [-6.0]] + [[0.0]] * 30], np.float32))  # (1, in=32, out=1)
    >>> b.shape, s.shape, int(b[0, 0, 0, 0]), int(s[0, 0, 0])
    ((1, 1, 1, 16), (1, 1, 1), 241, 127)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GROUP = 32
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # codes 0..7; bit 3 is the sign
MXFP4_PARAMS = ("gate_up_proj", "down_proj")  # gpt_oss's expert parameters stored as MXFP4 on the hub


def mxfp4_pack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) of a stacked expert parameter P (E, in, out), as gpt-oss checkpoints store it."""
    w = np.ascontiguousarray(np.swapaxes(p.astype(np.float32), 1, 2))  # (E, out, in)
    e, o, n = w.shape
    if n % GROUP:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {GROUP}, got {n}")
    g = w.reshape(e, o, n // GROUP, GROUP)
    amax = np.abs(g).max(-1)
    with np.errstate(divide="ignore"):  # an all-zero group gets exponent 0
        exp = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / E2M1[-1])), 0).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    x = g / np.ldexp(np.float32(1), exp)[..., None]
    mag = np.abs(np.clip(x, -6, 6))
    code = np.abs(mag[..., None] - E2M1).argmin(-1).astype(np.uint8) | np.where(x < 0, 8, 0).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)  # (E, out, in/32, 16)
    return blocks, (exp + 127).astype(np.uint8)


def mxfp4_unpack(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """P (E, in, out) float32 back from (blocks, scales): the inverse of `mxfp4_pack` on the MXFP4 grid."""
    code = np.stack([blocks & 15, blocks >> 4], -1).reshape(*blocks.shape[:-1], -1)
    val = np.where(code & 8, -1, 1) * E2M1[code & 7]
    w = (val * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]).astype(np.float32)
    return np.swapaxes(w.reshape(*w.shape[:2], -1), 1, 2)


def to_mxfp4_hub(out: Path, config: dict) -> dict:
    """Rewrite a saved gpt_oss checkpoint's expert parameters as the hub's MXFP4 layout; return config.json
    with the `quantization_config` the hub checkpoints carry (everything but the experts unquantized)."""
    from safetensors.numpy import load_file, save_file

    for f in sorted(Path(out).glob("model*.safetensors")):
        ts, new = load_file(str(f)), {}
        for k, v in ts.items():
            if k.rsplit(".", 1)[-1] in MXFP4_PARAMS:
                new[f"{k}_blocks"], new[f"{k}_scales"] = mxfp4_pack(v)
            else:
                new[k] = v
        save_file(new, str(f), metadata={"format": "pt"})
    index = Path(out) / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        wm = {}
        for k, v in idx["weight_map"].items():
            names = [f"{k}_blocks", f"{k}_scales"] if k.rsplit(".", 1)[-1] in MXFP4_PARAMS else [k]
            wm.update({n: v for n in names})
        index.write_text(json.dumps({**idx, "weight_map": wm}, indent=2))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return config


def hub_transposes(model_type: str) -> list[tuple[str, int, int]]:
    """(key pattern, dim0, dim1) of the tensors transformers transposes on load only when their shape differs
    from its own (`Transpose(check_dims=True)` in its conversion mapping: qwen3_vl_moe's experts, stored
    (E, in, out) on the hub); `save_pretrained` writes its own layout for them, not the hub's."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    out = []
    for c in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(c, WeightConverter) and c.source_patterns == c.target_patterns and len(c.source_patterns) == 1:
            out += [(c.source_patterns[0], o.dim0, o.dim1) for o in c.operations
                    if isinstance(o, Transpose) and o.check_dims]
    return out


def to_hub_transposed(out: Path, model_type: str) -> None:
    """Rewrite a saved checkpoint's tensors that `hub_transposes` names in the hub's layout, and rename the keys
    the type's `Quirks.hub_renames` names as the hub does."""
    import re

    from safetensors.numpy import load_file, save_file

    from .quirks import QUIRKS, Quirks

    rules = hub_transposes(model_type)
    renames = QUIRKS.get(model_type, Quirks()).hub_renames
    if not rules and not renames:
        return
    for f in sorted(Path(out).glob("model*.safetensors")):
        ts = load_file(str(f))
        for k, v in ts.items():
            for pat, a, b in rules:
                if re.search(pat, k):
                    ts[k] = np.ascontiguousarray(np.swapaxes(v, a, b))
        for pat, new in renames:  # the hub's names where save_pretrained writes others
            ts = {re.sub(pat, new, k): v for k, v in ts.items()}
        save_file(ts, str(f), metadata={"format": "pt"})
    index = Path(out) / "model.safetensors.index.json"
    if renames and index.exists():
        idx = json.loads(index.read_text())
        wm = idx["weight_map"]
        for pat, new in renames:
            wm = {re.sub(pat, new, k): v for k, v in wm.items()}
        index.write_text(json.dumps({**idx, "weight_map": wm}, indent=2))
