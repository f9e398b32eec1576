"""What vLLM and TensorRT-LLM require of an export directory, checked without either installed.

Framework-free (json + safetensors headers via `mlx_bridge.formats`), so the translator can call
`check_export` right after writing a directory, on the Mac as on the GPU box.

Sources of each rule (read from the engines' code, see docs/serving.md):
- vLLM picks the model class from `config.json` `architectures` (model_executor/models/registry.py),
  with a Transformers-backend fallback for unknown ones; reads `dtype`/`torch_dtype`,
  `quantization_config`; loads every `*.safetensors` in the directory unless
  `model.safetensors.index.json` names the shards (model_loader/weight_utils.py:
  filter_duplicate_safetensors_files); reads `generation_config.json` for default sampling.
- vLLM LoRA: `PEFTHelper` requires `r`, `lora_alpha`, `target_modules` and refuses `modules_to_save`
  and `use_dora`; tensors must be `lora_A.weight`/`lora_B.weight` (lora/utils.py:
  parse_fine_tuned_lora_name) of modules whose last name is a LoRA-capable layer
  (lora_model.py: check_unexpected_modules); rank <= `--max-lora-rank`, one of 1, 8, 16, 32, 64, 128,
  256, 320, 512, default 16 (config/lora.py).
- TensorRT-LLM (PyTorch backend, `LLM(model=DIR)`): `architectures[0]` picks the class;
  HfWeightLoader loads every `*.safetensors` in the directory (no index filtering); HF LoRA modules
  map by last name (lora_helper.py: get_default_trtllm_modules_to_hf_modules).

Example:
    >>> check_export("deploy/alpaca")  # doctest: +SKIP
    []
    >>> check_export("broken/")  # doctest: +SKIP
    ['config.json: quantization_config is present (MLX quantization); vLLM and TensorRT-LLM ...']
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..archs import supported
from ..archs.engines import TRTLLM_ARCHITECTURES, VLLM_ARCHITECTURES
from ..archs.registry import get_arch
from ..errors import BridgeError
from ..formats.safetensors import read_header

INDEX = "model.safetensors.index.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Last module names vLLM and TRT-LLM accept LoRA weights for (packed names included).
LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj", "gate_up_proj"})
LORA_MOE_MODULES = frozenset({"gate", "w1", "w2", "w3"})  # router + mixtral experts
LORA_EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})  # vLLM: depends on the model and version
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MLX_KEY = re.compile(r"(\.scales$|\.biases$|switch_mlp|\.lora_[ab]$)")


def check_export(path: str | os.PathLike, *, max_lora_rank: int | None = None) -> list[str]:
    """Problems that stop vLLM or TensorRT-LLM from serving `path` as written (empty list: ready).

    A directory with `adapter_config.json` is checked as a PEFT LoRA adapter, any other as a full
    Hugging Face model directory. Each problem names the file and key.

    Args:
        path: an export directory.
        max_lora_rank: the `--max-lora-rank` the adapter will be served with; None accepts any rank
            vLLM can be configured for (<= 512), see `serving_notes` for the flag it then needs.

    Example:
        >>> check_export("deploy/alpaca")  # doctest: +SKIP
        []
    """
    d = Path(path)
    if not d.is_dir():
        return [f"{d}: not a directory"]
    if (d / PEFT_CONFIG).exists():
        return _check_peft(d, max_lora_rank)
    return _check_model(d)


def serving_notes(path: str | os.PathLike) -> list[str]:
    """Things that do not stop loading but change how vLLM/TRT-LLM run the export (flags, fallbacks).

    Example:
        >>> serving_notes("deploy/alpaca-lora")  # doctest: +SKIP
        ['adapter_config.json: r=32 is above vLLM's default max_lora_rank 16: serve with --max-lora-rank 32']
    """
    d = Path(path)
    if (d / PEFT_CONFIG).exists():
        cfg = _read_json(d / PEFT_CONFIG, [])
        notes = []
        r = cfg.get("r") if cfg else None
        if isinstance(r, int) and r > VLLM_DEFAULT_MAX_LORA_RANK:
            notes.append(f"{PEFT_CONFIG}: r={r} is above vLLM's default max_lora_rank "
                         f"{VLLM_DEFAULT_MAX_LORA_RANK}: serve with --max-lora-rank {lora_rank_flag(r)}")
        if cfg and not cfg.get("base_model_name_or_path"):
            notes.append(f"{PEFT_CONFIG}: base_model_name_or_path is empty: pass the base model explicitly")
        try:
            modules = set(_lora_modules(read_header(d / PEFT_WEIGHTS)[0])[0])
        except (BridgeError, OSError):
            return notes
        if any(".experts." in m for m in modules):
            notes.append(f"{PEFT_WEIGHTS}: LoRA on MoE experts: only recent vLLM versions apply it to fused MoE "
                         "layers; export with --format hf (merged) to be safe")
        if any(m.rsplit(".", 1)[-1] in LORA_EMBEDDING_MODULES for m in modules):
            notes.append(f"{PEFT_WEIGHTS}: LoRA on embed_tokens/lm_head: vLLM's support depends on the model and "
                         "version; export with --format hf (merged) to be safe")
        return notes
    cfg = _read_json(d / "config.json", []) or {}
    notes = []
    arch = (cfg.get("architectures") or [None])[0]
    if arch and arch not in VLLM_ARCHITECTURES:
        notes.append(f"config.json: {arch} is not a native vLLM class: vLLM runs it with its Transformers backend")
    if arch and arch not in TRTLLM_ARCHITECTURES:
        notes.append(f"config.json: {arch} is not in TensorRT-LLM's PyTorch-backend model list")
    if _config_dtype(cfg) == "float32":
        notes.append("config.json: dtype float32: vLLM's --dtype auto runs float32 checkpoints in half "
                     "precision; pass --dtype float32 to keep it")
    if "rope_parameters" in cfg and "rope_theta" not in cfg:
        theta = (cfg["rope_parameters"] or {}).get("rope_theta") if isinstance(cfg["rope_parameters"], dict) else None
        notes.append(f"config.json: rope_theta ({theta}) only inside rope_parameters (transformers v5): engines "
                     "bundling transformers < 5 read the top-level rope_theta and would use their default")
    if "dtype" in cfg and "torch_dtype" not in cfg:
        notes.append("config.json: dtype without torch_dtype: engines bundling transformers < 4.56 read torch_dtype")
    if not _has_chat_template(d):
        notes.append("tokenizer_config.json: no chat template: /v1/chat/completions needs --chat-template")
    if "max_position_embeddings" not in cfg:
        notes.append("config.json: no max_position_embeddings: pass --max-model-len")
    return notes


def lora_rank_flag(r: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that fits rank `r`.

    Example:
        >>> lora_rank_flag(8), lora_rank_flag(20), lora_rank_flag(300)
        (8, 32, 320)
    """
    for v in VLLM_MAX_LORA_RANKS:
        if v >= r:
            return v
    raise BridgeError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")


def serve_commands(path: str | os.PathLike, *, base: str | None = None, name: str = "adapter") -> dict[str, str]:
    """Commands that serve the export: `mlx-bridge`, `vllm`, `trtllm` (a PEFT dir needs its base model).

    Example:
        >>> serve_commands("deploy/alpaca")["vllm"]  # doctest: +SKIP
        'vllm serve deploy/alpaca'
    """
    d = str(path)
    if (Path(path) / PEFT_CONFIG).exists():
        cfg = _read_json(Path(path) / PEFT_CONFIG, []) or {}
        base = base or cfg.get("base_model_name_or_path") or "BASE"
        r = cfg.get("r") if isinstance(cfg.get("r"), int) else VLLM_DEFAULT_MAX_LORA_RANK
        flag = lora_rank_flag(r)
        return {
            "vllm": f"vllm serve {base} --enable-lora --lora-modules {name}={d} --max-lora-rank {flag}",
            "trtllm": (f"LLM(model={base!r}, lora_config=LoraConfig(lora_dir=[{d!r}], max_lora_rank={r}, "
                       f"max_loras=1, max_cpu_loras=1))"),
        }
    return {"mlx-bridge": f"mlx-bridge serve {d}", "vllm": f"vllm serve {d}", "trtllm": f"LLM(model={d!r})"}


# -- full model directory ------------------------------------------------------------------------------

def _check_model(d: Path) -> list[str]:
    problems: list[str] = []
    cfg = _read_json(d / "config.json", problems)
    if cfg is not None:
        problems += _check_config(cfg)
    if not (d / "generation_config.json").exists():
        problems.append("generation_config.json: missing (vLLM and transformers read default sampling and EOS from it)")
    else:
        _read_json(d / "generation_config.json", problems)
    if not any(all((d / f).exists() for f in group) for group in TOKENIZER_FILES):
        problems.append("tokenizer: no tokenizer.json, tokenizer.model, vocab.json+merges.txt or vocab.txt")
    if not (d / "tokenizer_config.json").exists():
        problems.append("tokenizer_config.json: missing")
    for pattern in PICKLE_WEIGHTS:
        problems += [f"{p.name}: pickle weights; the export must hold safetensors only"
                     for p in sorted(d.glob(pattern))]
    problems += _check_weights(d, _config_dtype(cfg) if cfg else None)
    return problems


def _check_config(cfg: dict) -> list[str]:
    problems = []
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        problems.append("config.json: architectures must be a non-empty list of class names (vLLM and TRT-LLM pick "
                        "the model class from architectures[0])")
        archs = None
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        problems.append("config.json: model_type is missing")
    elif archs and mt in supported() and archs[0] != get_arch(cfg).architecture:
        problems.append(f"config.json: architectures[0] {archs[0]!r} does not match model_type {mt!r} "
                        f"(expected {get_arch(cfg).architecture!r})")
    for key in ("quantization_config", "quantization"):
        if cfg.get(key) is not None:
            problems.append(f"config.json: {key} is present ({json.dumps(cfg[key])[:80]}); MLX quantization is not a "
                            "format vLLM or TRT-LLM can load: export dequantized")
    dt = _config_dtype(cfg)
    if dt is None:
        problems.append("config.json: no dtype/torch_dtype (engines then assume float32)")
    elif dt not in DTYPES:
        problems.append(f"config.json: dtype {dt!r} is not one of {', '.join(DTYPES)}")
    if cfg.get("auto_map"):
        problems.append("config.json: auto_map needs trust_remote_code; the export must use a built-in class")
    return problems


def _check_weights(d: Path, dtype: str | None) -> list[str]:
    problems: list[str] = []
    files = sorted(p.name for p in d.glob("*.safetensors"))
    weight_files = [f for f in files if f.startswith("model")]
    if not weight_files:
        return problems + ["model*.safetensors: no weight files"]
    if (d / INDEX).exists():
        index = _read_json(d / INDEX, problems)
        wm = index.get("weight_map") if index else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            return problems + ([f"{INDEX}: weight_map must map tensor names to file names"] if index else [])
        shards: dict[str, set | None] = {f: {k for k, v in wm.items() if v == f} for f in sorted(set(wm.values()))}
        problems += [f"{INDEX}: weight_map names {f}, which does not exist" for f in shards if not (d / f).exists()]
        problems += [f"{f}: not in {INDEX} (vLLM skips it, transformers and TRT-LLM read it)"
                     for f in weight_files if f not in shards]
    else:
        if files != ["model.safetensors"]:
            problems.append(f"{INDEX}: missing while the directory holds {', '.join(files)}: without an index vLLM "
                            "loads every *.safetensors file as weights")
        shards = {f: None for f in weight_files}
    counts: dict[str, int] = {}
    for f, listed in shards.items():
        if not (d / f).exists():
            continue
        try:
            tensors, meta, _ = read_header(d / f)
        except BridgeError as e:
            problems.append(str(e))
            continue
        fmt = meta.get("format")
        if fmt != "pt":
            problems.append(f"{f}: metadata format {fmt!r}; Hugging Face loaders expect 'pt' (transformers 4.x "
                            "refuses other values, and 'mlx' before 4.39)")
        bad = [k for k in tensors if MLX_KEY.search(k)]
        if bad:
            problems.append(f"{f}: MLX-layout tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                            "quantized, stacked-expert or unfused LoRA weights are not Hugging Face layout")
        packed = [k for k, t in tensors.items() if t.dtype == "U32"]
        if packed and not bad:
            problems.append(f"{f}: uint32 tensors ({', '.join(packed[:3])}): packed quantized weights")
        if listed is not None:
            missing, extra = sorted(listed - tensors.keys()), sorted(tensors.keys() - listed)
            if missing:
                problems.append(f"{INDEX}: lists {missing[0]} in {f}, which does not hold it ({len(missing)} such)")
            if extra:
                problems.append(f"{f}: holds {extra[0]}, which {INDEX} does not list ({len(extra)} such)")
        for t in tensors.values():
            if t.dtype in ("F32", "F16", "BF16"):
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
    if dtype in DTYPES and counts and max(counts, key=counts.get) != DTYPES[dtype]:
        problems.append(f"config.json: dtype {dtype} but most weights are {max(counts, key=counts.get)} ({counts})")
    return problems


# -- PEFT LoRA adapter ---------------------------------------------------------------------------------

def _check_peft(d: Path, max_lora_rank: int | None) -> list[str]:
    problems: list[str] = []
    cfg = _read_json(d / PEFT_CONFIG, problems)
    if cfg is None:
        return problems
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) in (None, [], ""):
            problems.append(f"{PEFT_CONFIG}: {key} is required (vLLM PEFTHelper)")
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"{PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}; vLLM and TRT-LLM load LORA only")
    if cfg.get("use_dora"):
        problems.append(f"{PEFT_CONFIG}: use_dora is true; vLLM does not support DoRA: "
                        "export with --format hf (merged)")
    if cfg.get("modules_to_save"):
        problems.append(f"{PEFT_CONFIG}: modules_to_save {cfg['modules_to_save']}; vLLM only supports none: "
                        "export with --format hf (merged)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"{PEFT_CONFIG}: bias {cfg['bias']!r}; vLLM needs 'none' unless started with "
                        "--enable-lora-bias")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{PEFT_CONFIG}: {key} is set; vLLM ignores it and would scale every module "
                            "by lora_alpha/r")
    r = cfg.get("r")
    limit = max_lora_rank if max_lora_rank is not None else VLLM_MAX_LORA_RANKS[-1]
    if isinstance(r, int) and r > limit:
        problems.append(f"{PEFT_CONFIG}: r={r} is above max_lora_rank {limit}")
    if not (d / PEFT_WEIGHTS).exists():
        return problems + [f"{PEFT_WEIGHTS}: missing"]
    try:
        tensors, meta, _ = read_header(d / PEFT_WEIGHTS)
    except BridgeError as e:
        return problems + [str(e)]
    if meta.get("format") != "pt":
        problems.append(f"{PEFT_WEIGHTS}: metadata format {meta.get('format')!r}; PEFT writes 'pt'")
    problems += _check_lora_tensors(tensors, cfg)
    return problems


LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(?:(lora_[AB])\.weight|lora_embedding_([AB]))")


def _lora_modules(tensors: dict) -> tuple[dict[str, dict[str, tuple]], list[str]]:
    """{module: {"lora_A": shape, "lora_B": shape}} and the names that are not LoRA factors."""
    modules: dict[str, dict[str, tuple]] = {}
    others = []
    for name, t in tensors.items():
        m = LORA_KEY.fullmatch(name)
        if m is None:
            others.append(name)
        else:
            modules.setdefault(m.group(1), {})[m.group(2) or f"lora_{m.group(3)}"] = t.shape
    return modules, others


def _check_lora_tensors(tensors: dict, cfg: dict) -> list[str]:
    problems: list[str] = []
    modules, others = _lora_modules(tensors)
    by_why: dict[str, list[str]] = {}  # one line per kind of tensor, not one per tensor (a DoRA adapter has hundreds)
    for name in others:
        why = ("DoRA magnitude" if name.endswith("lora_magnitude_vector") else
               "a full weight (modules_to_save)" if name.endswith(".weight") else "not lora_A/lora_B")
        by_why.setdefault(why, []).append(name)
    for why, names in by_why.items():
        which = f"{names[0]} is" if len(names) == 1 else f"{len(names)} tensors are {why} (e.g. {names[0]}):"
        problems.append(f"{PEFT_WEIGHTS}: {which}{f' {why};' if len(names) == 1 else ''} vLLM accepts only "
                        "lora_A/lora_B weights")
    r, targets = cfg.get("r"), cfg.get("target_modules")
    for mod, ab in sorted(modules.items()):
        last = mod.rsplit(".", 1)[-1]
        if last not in LORA_MODULES | LORA_MOE_MODULES | LORA_EMBEDDING_MODULES:
            problems.append(f"{PEFT_WEIGHTS}: {mod} is not a layer vLLM/TRT-LLM apply LoRA to "
                            f"({', '.join(sorted(LORA_MODULES))})")
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{PEFT_WEIGHTS}: {mod} has {', '.join(sorted(ab))} only; LoRA needs lora_A and lora_B")
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{PEFT_WEIGHTS}: {mod} lora_A {list(a)} and lora_B {list(b)} are not (r, in) and (out, r)")
        elif isinstance(r, int) and not cfg.get("rank_pattern") and a[0] != r:
            problems.append(f"{PEFT_WEIGHTS}: {mod} has rank {a[0]}, {PEFT_CONFIG} says r={r}")
        if targets and not _peft_targets(mod, targets, cfg.get("layers_to_transform")):
            problems.append(f"{PEFT_CONFIG}: target_modules {targets} does not match {mod} (PEFT would not load it)")
    if not modules and not problems:
        problems.append(f"{PEFT_WEIGHTS}: holds no LoRA tensors")
    return problems


def _peft_targets(module: str, targets, layers) -> bool:
    """PEFT's own rule (tuners_utils.check_target_module_exists): regex fullmatch, or exact/suffix match."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    if not (module in targets or any(module.endswith("." + t) for t in targets)):
        return False
    if layers in (None, []):
        return True
    m = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    layers = [layers] if isinstance(layers, int) else layers
    return m is not None and int(m.group(1)) in layers


# -- helpers -------------------------------------------------------------------------------------------

def _read_json(p: Path, problems: list[str]) -> dict | None:
    try:
        value = json.loads(p.read_text())
    except FileNotFoundError:
        problems.append(f"{p.name}: missing")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{p.name}: not valid JSON ({e})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{p.name}: must be a JSON object")
        return None
    return value


def _config_dtype(cfg: dict) -> str | None:
    dt = cfg.get("dtype", cfg.get("torch_dtype"))
    return dt if isinstance(dt, str) else None


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").exists() or (d / "chat_template.json").exists():
        return True
    tc = _read_json(d / "tokenizer_config.json", []) or {}
    return bool(tc.get("chat_template"))
