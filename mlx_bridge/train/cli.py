"""`mlx-bridge train`: fine-tune with MLX and write a checkpoint directory.

    mlx-bridge train --model M --data D --out DIR [--config train.yaml] [--fine-tune-type lora|dora|full]
                     [--lora-rank 8] [--lora-scale 20 | --lora-alpha A] [--targets q_proj,v_proj]
                     [--num-layers -1] [--epochs 1 | --iters N] [--batch-size 4] [--grad-accum 1] [--lr 1e-05]
                     [--lr-schedule constant] [--warmup 0] [--max-seq-len 2048] [--mask-prompt/--no-mask-prompt]
                     [--grad-checkpoint] [--seed 0] [--save-every N] [--keep-last N] [--eval-every N]
                     [--resume | --force]

`--help` shows the defaults (those of `TrainConfig`). Precedence: command-line flags, then the YAML `--config` (keys are the flag names, `-` or `_`; mlx-lm's
`lora_parameters` block is also read), then the defaults of `TrainConfig`.
"""

from __future__ import annotations

import argparse
import json

from ..errors import BridgeError
from .config import DATA_FORMATS

# CLI dest -> TrainConfig field, where they differ
DEST = {"lr": "learning_rate"}
# pairs where giving one on the command line overrides the other from the YAML file
EXCLUSIVE = (("lora_alpha", "lora_scale"), ("epochs", "iters"))


def _targets(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def config_defaults() -> dict:
    """CLI dest -> the TrainConfig default it stands for (what `--help` shows)."""
    from dataclasses import fields

    from .config import TrainConfig

    by_field = {f.name: f.default for f in fields(TrainConfig)}
    inverse = {v: k for k, v in DEST.items()}
    return {inverse.get(k, k): v for k, v in by_field.items()}


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the train flags; every default is None so that YAML and TrainConfig defaults show through
    (`--help` states the TrainConfig defaults)."""
    from ..clihelp import show_defaults

    a = parser.add_argument
    a("--model", help="local MLX (or Hugging Face) model directory, or a hub id; a quantized model means QLoRA")
    a("--data", help="a .json/.jsonl file, a directory with train/valid/test splits, or a hub dataset name")
    a("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    a("--out", help="checkpoint directory to write")
    a("--config", help="YAML file with any of these settings")
    a("--fine-tune-type", choices=["lora", "dora", "full"], help="what is trained")
    a("--lora-rank", type=int, help="adapter rank r")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--lora-alpha", type=float, help="PEFT-style alpha: scale = alpha / rank")
    g.add_argument("--lora-scale", type=float, help="mlx-lm-style scale (default: 20, mlx-lm's, when neither is given)")
    a("--lora-dropout", type=float, help="dropout on the adapter input")
    a("--targets", type=_targets, help="comma-separated module names in a block (q_proj,v_proj or self_attn.q_proj; default: every linear "
        "layer of the block, as mlx-lm does)")
    a("--num-layers", type=int, help="train the last N blocks (-1 = all)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the train split (default: 1 when --iters is not given)")
    g.add_argument("--iters", type=int, help="optimizer steps")
    a("--batch-size", type=int, help="examples per micro-batch")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--lr", type=float, help="learning rate (peak, after warmup)")
    a("--lr-schedule", choices=["constant", "cosine", "linear"], help="learning-rate schedule after warmup")
    a("--warmup", type=int, help="linear warmup steps")
    a("--min-lr", type=float, help="final learning rate of cosine/linear decay")
    a("--optimizer", choices=["adam", "adamw", "sgd"], help="optimizer")
    a("--weight-decay", type=float, help="weight decay (adamw, sgd)")
    a("--max-seq-len", type=int, help="longer examples are truncated (a warning counts them)")
    a("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
      help="loss on response tokens only (default: yes, except for the text format)")
    a("--data-format", choices=list(DATA_FORMATS), help="override the format detected from the records")
    a("--template", choices=["chat_template", "alpaca", "plain"], help="how records become text (default: the tokenizer's chat template when it has "
      "one, else alpaca, or plain for completions)")
    a("--valid-fraction", type=float, help="held out for validation when the data has no valid split")
    a("--grad-checkpoint", action="store_true", default=None, help="recompute activations in the backward pass (less memory)")
    a("--no-compile", dest="compile", action="store_false", default=None, help="do not mx.compile the step (default: compiled)")
    a("--seed", type=int, help="seed of data order, held-out split, dropout and initialisation")
    a("--save-every", type=int, help="also keep a numbered checkpoint OUT/checkpoints/step-NNNNNNN every N steps "
      "(0: only the final checkpoint in OUT)")
    a("--keep-last", type=int, help="numbered checkpoints to keep (0 = all)")
    a("--eval-every", type=int, help="validate at step 0, every N steps and at the end (0: only at the end)")
    a("--val-batches", type=int, help="batches per validation (-1 = all; the final validation too)")
    a("--resume", action="store_true", default=None, help="continue from the checkpoint in --out")
    a("--force", action="store_true", default=None, help="replace an existing --out")
    a("--quiet", action="store_true", default=None, help="no progress bar or messages")
    show_defaults(parser, config_defaults())


def settings_from(args: argparse.Namespace) -> dict:
    """Merge YAML (if --config) and command-line values: the command line wins."""
    from .config import load_yaml, normalize

    settings = load_yaml(args.config) if getattr(args, "config", None) else {}
    skip = {"command", "debug", "version", "config"}
    cli = {DEST.get(k, k): v for k, v in vars(args).items() if k not in skip and v is not None}
    cli = normalize(cli, "command line")
    for pair in EXCLUSIVE:
        for k in pair:
            if k in cli:
                for other in pair:
                    if other != k:
                        settings.pop(other, None)
    settings.update(cli)
    return settings


def main(args: argparse.Namespace) -> int:
    from .trainer import MLXTrainer

    s = settings_from(args)
    missing = [f"--{k}" for k in ("model", "data", "out") if not s.get(k)]
    if missing:
        raise BridgeError(f"train: {', '.join(missing)} required (on the command line or in the --config file)")
    model, data, out = s.pop("model"), s.pop("data"), s.pop("out")
    resume, force = bool(s.pop("resume", False)), bool(s.pop("force", False))
    revision = s.pop("revision", None)
    if resume and force:
        raise BridgeError("train: --resume and --force exclude each other")
    trainer = MLXTrainer(model, data, out=out, resume=resume, force=force, revision=revision, **s)
    summary = trainer.train()
    print(json.dumps({"checkpoint": str(out), **{k: summary[k] for k in (
        "steps", "epochs", "tokens", "final_train_loss", "final_valid_loss", "tokens_per_sec", "startup_seconds",
        "steady_tokens_per_sec", "trained_on")}}, default=str))
    return 0
