"""Key rules of mlx-vlm conversions, read from mlx-vlm itself (the tensors mlx-lm drops: vision towers, projectors).

A multimodal base converted by `mlx_vlm.convert` keeps its vision tower and projector under mlx-vlm's names and
layouts (mistral3: `vision_tower.vision_model.*`, its patch conv as [out, kh, kw, in]). For each type this runs
mlx-vlm's own conversion on a tiny transformers checkpoint and finds, for every tensor mlx-lm drops, the mlx-vlm
tensor holding the same values and the transpose that maps one onto the other. Needs mlx-vlm; the translator
only reads the result (`archs/mlx_vlm.json`).

Example:
    >>> derive_vlm("mistral3")["vision_tower.vision_model.patch_conv.weight"]   # doctest: +SKIP
    {'hf': 'vision_tower.patch_conv.weight', 'perm': [0, 3, 1, 2]}
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import tempfile
from pathlib import Path

import numpy as np

from .derive import Refused
from .registry import describe, template

def types() -> list[str]:
    """The multimodal wrappers the registry exports whose tensors mlx-lm drops (their vision towers)."""
    from .registry import supported

    return [t for t in supported() if describe(t).dropped and describe(t).hf_auto != "causal_lm"]


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from ..formats import SafetensorsFile

    out = {}
    for p in sorted(d.glob("*.safetensors")):
        f = SafetensorsFile(p)
        for k in f.keys():
            out[k] = np.array(f.read(k))
        f.close()
    return out


def _match(want: np.ndarray, vlm: dict[str, np.ndarray]) -> tuple[str, list[int] | None] | None:
    """The mlx-vlm tensor holding `want`'s values, and the transpose taking it back to `want`'s layout."""
    for k, v in vlm.items():
        if v.size != want.size or v.dtype != want.dtype:
            continue
        for perm in itertools.permutations(range(v.ndim)):
            if tuple(v.shape[i] for i in perm) == want.shape and np.array_equal(np.transpose(v, perm), want):
                return k, (None if list(perm) == list(range(v.ndim)) else list(perm))
    return None


def _hub_layout(hf: Path, model_type: str) -> None:
    """Rewrite the tiny checkpoint's keys as hub checkpoints name them, which is what mlx-vlm reads.

    transformers 5 loads a nested vision model's hub names through its conversion mapping (SigLIP's
    `PrefixChange(prefix_to_remove="vision_model")`) but saves them without it; put the prefix back.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from ..formats.safetensors import save_file

    _v4_config(hf, model_type)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(hf))
    _image_processor(hf, model_type, model.config)
    add = {}  # saved prefix -> the prefix to insert after it
    for path, mod in model.named_modules():
        for rule in get_checkpoint_conversion_mapping(type(mod).__name__) or []:
            if path and getattr(rule, "prefix_to_remove", None) and not getattr(rule, "model_prefix", ""):
                add[path.removeprefix("model.") + "."] = rule.prefix_to_remove + "."
    if not add:
        return
    tensors = _tensors(hf)
    for f in hf.glob("*.safetensors"):
        f.unlink()
    (hf / "model.safetensors.index.json").unlink(missing_ok=True)
    renamed = {}
    for k, v in tensors.items():
        pre = next((p for p in add if k.startswith(p)), None)
        renamed[k if pre is None else pre + add[pre] + k[len(pre):]] = v
    save_file(renamed, hf / "model.safetensors")


def _v4_config(hf: Path, model_type: str) -> None:
    """Write config.json in the spellings hub configs (transformers 4) use and mlx-vlm reads: a vision config
    named after its wrapper (`qwen2_vl`, not transformers 5's `qwen2_vl_vision`) and `rope_theta` beside each
    `rope_parameters`. Kept only where transformers 5 reads the file back to the same config."""
    import json

    from transformers import AutoConfig

    path = hf / "config.json"
    text = path.read_text()
    cfg = json.loads(text)
    want = AutoConfig.from_pretrained(hf).to_dict()
    vc = cfg.get("vision_config")
    if isinstance(vc, dict) and vc.get("model_type") == f"{model_type}_vision":
        vc["model_type"] = model_type
    for sub in (cfg, cfg.get("text_config"), vc):
        rp = sub.get("rope_parameters") if isinstance(sub, dict) else None
        if isinstance(rp, dict) and "rope_theta" in rp:
            sub.setdefault("rope_theta", rp["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2))
    if AutoConfig.from_pretrained(hf).to_dict() != want:
        path.write_text(text)  # not spellings transformers reads back: leave the file as it was


def _image_processor(hf: Path, model_type: str, config) -> None:
    """Hub checkpoints ship preprocessor_config.json, and mlx-vlm's convert loads the processor: write the
    type's own image processor sized for the tiny vision tower."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    name = names.get("pil") if isinstance(names, dict) else names
    if not name or (hf / "preprocessor_config.json").exists():
        return
    cls = getattr(transformers, name)
    size = getattr(config.vision_config, "image_size", None)
    proc = cls(size={"height": size, "width": size}) if isinstance(size, int) else cls()
    proc.save_pretrained(hf)


def mlx_vlm_convert(hf: Path, out: Path, model_type: str, q_bits: int = 0, q_group_size: int = 32) -> None:
    """What `mlx_vlm.convert(hf, out, dtype="float32")` writes for the weights and config, from `hf` laid out as
    hub checkpoints are: mlx-vlm's own `load_model` (its sanitize rules) and `save_weights` / `save_config`.
    The processor step is left out (a tiny checkpoint's tokenizer lacks gemma3's image tokens; it writes no
    tensor). `q_bits`: quantized as `convert(quantize=True)` does (its `quantize_model`, the multimodal
    modules skipped by its own predicate)."""
    import shutil

    from mlx_vlm.utils import load_config, load_model, save_config, save_weights

    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        shutil.copytree(hf, hub)
        _hub_layout(hub, model_type)
        config = load_config(hub)
        with contextlib.redirect_stdout(io.StringIO()):
            model = load_model(hub, lazy=False)
            if q_bits:
                from mlx_vlm.convert import skip_multimodal_module
                from mlx_vlm.quant_utils import quantize_model

                own = getattr(model, "quant_predicate", None)
                config.setdefault("vision_config", {})
                model, config = quantize_model(model, config, q_group_size, q_bits, quant_predicate=lambda p, m: (
                    not skip_multimodal_module(p) and (own is None or own(p, m))))
            save_weights(Path(out), model, donate_weights=True)
        for f in [*hub.glob("*.json"), *hub.glob("*.jinja")]:
            if f.name != "model.safetensors.index.json":
                shutil.copy(f, out)
        save_config(config, config_path=Path(out) / "config.json")


def derive_vlm(model_type: str) -> dict[str, dict]:
    """{mlx-vlm tensor template: {"hf": HF template, "perm": transpose or absent}} for the tensors mlx-lm drops."""
    from ..testing.models import tiny_hf_model

    arch = describe(model_type)
    if not arch.dropped:
        raise Refused(f"{model_type}: mlx-lm drops nothing")
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "vlm"
        tiny_hf_model(hf, model_type, dtype="float32")
        try:
            mlx_vlm_convert(hf, out, model_type)
        except Exception as e:  # mlx-vlm refuses this tiny checkpoint: say why, derive nothing
            msg = re.sub(r"\{[^{}]*\}", lambda m: "{" + ", ".join(sorted(m[0][1:-1].split(", "))) + "}",
                         str(e).splitlines()[0][:200])  # a set in the message: its order varies by run
            raise Refused(f"mlx-vlm: {type(e).__name__}: {msg}") from e
        src, vlm = _tensors(hf), _tensors(out)
    dropped = set(arch.dropped)
    vlm = {k: v for k, v in vlm.items() if not arch.by_mlx.get(template(k)[0])}  # not a language-model tensor
    rules: dict[str, dict] = {}
    for k in sorted(src):
        t, nums = template(k)
        if t not in dropped:
            continue
        hit = _match(src[k], vlm)
        if hit is None:
            raise Refused(f"{k}: no mlx-vlm tensor holds its values")
        vk, perm = hit
        vt, vnums = template(vk)
        if vnums != nums:
            raise Refused(f"{k}: mlx-vlm's {vk} numbers its layers differently")
        rule = {"hf": t, **({"perm": perm} if perm else {})}
        if rules.setdefault(vt, rule) != rule:
            raise Refused(f"{vt}: two rules ({rules[vt]} and {rule})")
        del vlm[vk]
    if vlm:
        raise Refused(f"mlx-vlm tensors with no HF source: {sorted(vlm)[:3]}")
    return rules
