"""The export's model card (`README.md`): Hub front matter, what was trained on what, and how to run it.

Front matter follows the Hugging Face model card metadata: `base_model` is a hub id (never a local
path; left out when the base has none we know of), `library_name` transformers or peft, `datasets`
when the data came from the hub. The body gives the fine-tuning settings, the dataset, the
hyperparameters, the final losses, the parity result (filled in by `mlx_bridge.verify` when it runs)
and usage with transformers, vLLM and PEFT.

Example:
    >>> hub_id_of("/home/u/.cache/huggingface/hub/models--mlx-community--Qwen3-0.6B-4bit/snapshots/ab12")
    'mlx-community/Qwen3-0.6B-4bit'
    >>> hub_id_of("/data/my-model") is None
    True
"""

from __future__ import annotations

import re
from pathlib import Path

FILENAME = "README.md"
PARITY_START, PARITY_END = "<!-- parity -->", "<!-- /parity -->"
HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HYPERPARAMETERS = ("learning_rate", "lr_schedule", "warmup", "optimizer", "weight_decay", "batch_size", "grad_accum",
                   "total_steps", "epochs", "iters", "max_seq_len", "mask_prompt_effective", "lora_dropout",
                   "grad_checkpoint", "seed")


def hub_id_of(ref: str | None) -> str | None:
    """The hub id a model reference stands for: an `org/name` that is not a local directory, or the
    repository of a Hugging Face cache snapshot; None for any other local path."""
    if not ref:
        return None
    m = HUB_CACHE.search(str(ref))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if HUB_ID.fullmatch(str(ref)) and not Path(ref).expanduser().exists():
        return str(ref)
    return None


def base_hub_id(manifest, adapter_model: str | None, base_path: str) -> str | None:
    """The base model's hub id from what is known: the manifest, the adapter config's `model`, the path."""
    bm = manifest.base_model if manifest else {}
    for ref in (bm.get("hub_id"), adapter_model, bm.get("path"), base_path):
        if hub_id_of(ref):
            return hub_id_of(ref)
    return None


def _front_matter(base_id: str | None, fmt: str, adapter_type: str | None, dataset: dict) -> list[str]:
    lines = ["---"]
    if base_id:
        lines.append(f"base_model: {base_id}")
    lines.append("library_name: " + ("peft" if fmt == "peft" else "transformers"))
    lines.append("pipeline_tag: text-generation")
    lines += ["tags:", "- mlx-bridge", "- mlx"] + ([f"- {adapter_type}"] if adapter_type else [])
    if dataset.get("name") and not dataset.get("path") and hub_id_of(dataset["name"]):
        lines += ["datasets:", f"- {dataset['name']}"]
    return lines + ["---", ""]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _training(manifest) -> list[str]:
    if manifest is None or manifest.kind != "checkpoint" and not manifest.training:
        return []
    out = []
    ad, ds, tr, hp = manifest.adapter, manifest.dataset, manifest.training, manifest.hyperparameters
    if ad:
        what = f"{ad.get('type')}"
        if ad.get("type") != "full":
            what += (f", rank {ad.get('rank')}, scale {_fmt(ad.get('scale'))} (PEFT lora_alpha "
                     f"{_fmt(ad.get('lora_alpha'))})")
        if ad.get("targets"):
            what += f", on {', '.join(ad['targets'])}"
        if ad.get("layers") is not None:
            what += f" in {len(ad['layers'])} blocks"
        out += ["## Fine-tuning", "", f"- adapter: {what}"]
    if ds:
        counts = ds.get("counts") or {}
        out.append(f"- dataset: `{ds.get('name')}` ({ds.get('format')} format, template {ds.get('template')}; "
                   + ", ".join(f"{counts[k]} {k}" for k in ("train", "valid", "test") if counts.get(k))
                   + f"; sha256 {str(ds.get('sha256'))[:12]}…)")
    if hp:
        out.append("- hyperparameters: " + ", ".join(f"{k} {_fmt(hp[k])}" for k in HYPERPARAMETERS
                                                      if hp.get(k) is not None))
    if tr and tr.get("steps"):
        losses = [f"train {tr['final_train_loss']:.4f}" if tr.get("final_train_loss") is not None else None,
                  f"validation {tr['final_valid_loss']:.4f}" if tr.get("final_valid_loss") is not None else None]
        out.append(f"- after {tr['steps']} steps ({_fmt(tr.get('epochs'))} epochs): loss "
                   + ", ".join(x for x in losses if x))
    return out + [""] if out else []


def _usage(fmt: str, base_ref: str, name: str) -> list[str]:
    if fmt == "peft":
        return ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "from peft import PeftModel", f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
                f'model = PeftModel.from_pretrained(base, "{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "", "```bash",
                f"vllm serve {base_ref} --enable-lora --lora-modules adapter={name}", "```", ""]
    return ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "", "```bash", f"vllm serve {name}",
            f"mlx-bridge serve {name} --device cuda", "```", "",
            "The adapter is fused into the weights: no PEFT needed. `mlx_bridge.load(DIR)` runs it in PyTorch.", ""]


def parity_section(report: dict | None, fmt: str = "hf") -> list[str]:
    """The card's parity lines, between markers so that `verify` can replace them."""
    if report is None and fmt == "peft":
        body = ["Not checked here: `mlx-bridge verify` checks a Hugging Face export (`--format hf`) of the same "
                "checkpoint; this adapter holds the same LoRA factors (transposed), and `probes.safetensors` the "
                "MLX outputs to compare with."]
    elif report is None:
        body = ["Not checked yet: `mlx-bridge verify DIR` compares this export with the MLX outputs saved with "
                "the checkpoint (`probes.safetensors`) and writes the result here and in `parity.json`."]
    else:
        lg, gr, dp = report["logits"], report["greedy"], report["deployed"]
        body = [f"**{'PASS' if report['passed'] else 'FAIL'}** against {report['reference']['source']} "
                f"(MLX {report['reference']['dtype']}), loaded with {dp['backend']} on {dp['device']} in {dp['dtype']}: "
                f"largest logit difference {lg['max_abs_diff']:.3g} (limit {lg['limit']:.3g}) over "
                f"{report['probes']['num']} probes x {report['probes']['length']} tokens; greedy continuations "
                f"{gr['exact']}/{gr['of']} identical. Details: `parity.json`."]
    return ["## Parity with MLX", "", PARITY_START, *body, PARITY_END, ""]


def model_card(*, title: str, fmt: str, dtype: str, base_ref: str, base_id: str | None, manifest,
               notes: list[str], name: str = "DIR") -> str:
    """The card's text for an export (see the module docstring)."""
    ad_type = manifest.adapter.get("type") if manifest and manifest.adapter else None
    ds = manifest.dataset if manifest else {}
    lines = _front_matter(base_id, fmt, ad_type, ds or {})
    lines += [f"# {title}", "", f"Exported from MLX by mlx-bridge: {'a PEFT adapter' if fmt == 'peft' else 'a Hugging Face model'} "
              f"({dtype}) of `{base_id or base_ref}`.", ""]
    lines += _training(manifest)
    lines += parity_section(None, fmt)
    lines += _usage(fmt, base_id or base_ref, name)
    if notes:
        lines += ["## What MLX computed with", "", *[f"- {n}" for n in notes], ""]
    lines += ["`manifest.json` records the source, the hashes of every file (this card excepted: the parity check "
              "fills it in) and every setting.", ""]
    return "\n".join(lines)


def write_parity(directory: str | Path, report: dict) -> bool:
    """Put the parity result into the card of `directory`, if it has one of ours; True when it did."""
    p = Path(directory) / FILENAME
    if not p.is_file():
        return False
    text = p.read_text()
    if PARITY_START not in text or PARITY_END not in text:
        return False
    head, rest = text.split(PARITY_START, 1)
    tail = rest.split(PARITY_END, 1)[1]
    new = "\n".join(parity_section(report)).split(PARITY_START, 1)[1].split(PARITY_END, 1)[0]
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(head + PARITY_START + new + PARITY_END + tail)
    tmp.replace(p)
    return True
