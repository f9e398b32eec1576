"""The checkpoint directory: what `MLXTrainer.save_checkpoint` writes and `--resume` reads.

    adapters.safetensors    trainable tensors in mlx-lm's layout (LoRA/DoRA factors; full: the blocks)
    adapter_config.json     as mlx-lm's lora.py writes it (fine_tune_type, num_layers, lora_parameters
                            {rank, scale, dropout, keys}, ...), so `mlx_lm.load(base, adapter_path=dir)` works
    optimizer.safetensors   the optimizer state (step, learning rate, moments) for resume
    trainer_state.json      optimizer step, micro-batch position, tokens, seconds (resume)
    training_log.jsonl      one line per step and per validation
    loss.png                the loss curve (train smoothed, validation points)
    probes.safetensors      golden MLX outputs (mlx_bridge.probes)
    manifest.json           mlx_bridge.manifest.Manifest, kind "checkpoint", with files {name: hash}
    checkpoints/            numbered checkpoints with --save-every (mlx_bridge.train.numbered)

Everything is written into a temporary directory that is renamed over the target at the end
(`fsutil.atomic_dir`), so a crash mid-save leaves the previous checkpoint in place; a crash between the
renames that replace it is recovered by the next run (`fsutil.recover`). Resume checks every file
against the manifest's hashes (in the algorithm each names) before reading any of it.

Example:
    >>> save_checkpoint_dir("ckpt", sections, writers)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..errors import BridgeError, raise_all
from ..fsutil import atomic_dir, read_json, regular_file
from ..hashing import check_hashes, hash_file
from ..manifest import Manifest

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
LOG = "training_log.jsonl"
PLOT = "loss.png"


def adapter_config(cfg, adapter: dict, model_ref: str, data_ref: str | None, total_steps: int,
                   mask_prompt: bool | None = None) -> dict:
    """adapter_config.json in mlx-lm's `vars(args)` layout (the fields its loaders and tools read)."""
    lora = None
    if adapter["type"] != "full":
        lora = {"rank": adapter["rank"], "scale": adapter["scale"], "dropout": adapter["dropout"],
                "keys": adapter["targets"]}
    return {
        "fine_tune_type": adapter["type"], "num_layers": adapter["num_layers"], "lora_parameters": lora,
        "model": model_ref, "data": data_ref, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "iters": total_steps * cfg.grad_accum, "learning_rate": cfg.learning_rate, "optimizer": cfg.optimizer,
        "lr_schedule": None if cfg.lr_schedule == "constant" and not cfg.warmup else
        {"name": cfg.lr_schedule, "warmup": cfg.warmup, "min_lr": cfg.min_lr},
        "mask_prompt": cfg.mask_prompt if mask_prompt is None else mask_prompt, "max_seq_length": cfg.max_seq_len, "grad_checkpoint": cfg.grad_checkpoint,
        "grad_accumulation_steps": cfg.grad_accum, "adapter_path": None, "trained_with": "mlx-bridge",
    }


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_optimizer(optimizer: optim.Optimizer, path: Path) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(optimizer.state)))


def _load(path: Path) -> dict[str, mx.array]:
    """`mx.load` of a checkpoint file; a damaged one is one `BridgeError` naming it."""
    regular_file(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError for a damaged file
        raise BridgeError(f"{path}: unreadable ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from e


def load_optimizer(optimizer: optim.Optimizer, model: nn.Module, path: Path) -> None:
    """Restore the optimizer state saved by `save_optimizer`; every tensor must match by name and shape."""
    saved = _load(path)
    optimizer.init(model.trainable_parameters())
    have = dict(tree_flatten(optimizer.state))
    problems = [f"{k}: missing" for k in have if k not in saved and k != "learning_rate"]
    problems += [f"{k}: not a state of this optimizer" for k in saved if k not in have]
    problems += [f"{k}: shape {tuple(saved[k].shape)} != {tuple(v.shape)}" for k, v in have.items()
                 if k in saved and saved[k].shape != v.shape]
    raise_all(problems, str(path))
    # the next update's init() keeps entries that exist, so the loaded moments are used as they are
    optimizer.state = tree_map_with_path(lambda k, v: saved.get(k, v), optimizer.state)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load adapters.safetensors into the trainable parameters; names and shapes must match exactly."""
    saved = _load(path)
    have = trainable_weights(model)
    problems = [f"{k}: missing" for k in have if k not in saved]
    problems += [f"{k}: not a trainable parameter of this run" for k in saved if k not in have]
    problems += [f"{k}: shape {tuple(saved[k].shape)} != {tuple(v.shape)}" for k, v in have.items()
                 if k in saved and saved[k].shape != v.shape]
    raise_all(problems, str(path))
    model.load_weights(list(saved.items()), strict=False)
    mx.eval(model.parameters())


def write_checkpoint(out: str | os.PathLike, manifest: Manifest, writers: dict[str, Callable[[Path], None]],
                     force: bool = False, carry: tuple[str, ...] = ()) -> Path:
    """Write each file with its writer into a temp dir, hash them into the manifest, rename into place.

    The subdirectories named in `carry` (the numbered checkpoints) move from the old `out` into the new
    one as the last step before the rename, when nothing can fail any more.
    """
    with atomic_dir(out, force=force) as tmp:
        for name, write in writers.items():
            write(tmp / name)
        manifest.files = {p.name: hash_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest.save(tmp)
        for name in carry:
            if (Path(out) / name).is_dir():
                os.rename(Path(out) / name, tmp / name)
    return Path(out)


# trainer_state.json: field -> type (all >= 0)
STATE_FIELDS = {"step": int, "position": int, "total_steps": int, "tokens": int, "input_tokens": int,
                "seconds": (int, float)}


def read_resume_state(ckpt: Path) -> tuple[Manifest, dict]:
    """The manifest and trainer state of a checkpoint to resume, every file checked against the
    manifest's hashes first (in the algorithm each names); errors name the missing, changed or malformed file."""
    missing = [n for n in (ADAPTERS, OPTIMIZER, STATE, "manifest.json") if not (ckpt / n).is_file()]
    if missing:
        raise BridgeError(f"{ckpt}: cannot resume, missing {', '.join(missing)}")
    manifest = Manifest.load(ckpt)
    if manifest.kind != "checkpoint":
        raise BridgeError(f"{ckpt}/manifest.json: kind {manifest.kind!r} is not a checkpoint")
    unlisted = [n for n in (ADAPTERS, OPTIMIZER, STATE) if n not in manifest.files]
    if unlisted:
        raise BridgeError(f"{ckpt}/manifest.json: files lists no hash for {', '.join(unlisted)}; cannot check "
                          "the checkpoint before resuming it")
    check_hashes(ckpt, manifest.files)
    state = read_json(ckpt / STATE)
    problems = [f"{k}: {state.get(k)!r}, expected a number >= 0" for k, t in STATE_FIELDS.items()
                if not isinstance(state.get(k), t) or isinstance(state.get(k), bool) or state[k] < 0]
    if not problems and state["step"] > state["total_steps"]:
        problems.append(f"step {state['step']} is past total_steps {state['total_steps']}")
    raise_all(problems, str(ckpt / STATE))
    if (ckpt / LOG).exists():
        for i, line in enumerate(regular_file(ckpt / LOG).read_text().splitlines(), 1):
            try:
                ok = not line.strip() or isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise BridgeError(f"{ckpt / LOG}: line {i} is not a JSON object")
    return manifest, state


def has_checkpoint(d: Path) -> bool:
    return (d / STATE).is_file()
