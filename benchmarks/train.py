"""Training speed: `mlx_lm.lora` (its `train_model`) against `mlx-bridge train` (MLXTrainer), same run.

Both train LoRA (rank 8, scale 20, every block, all linear layers, Adam, constant lr, prompt masked) on
the same small random llama, the same prompt/completion data, batch size, max length and number of
steps, in one process, alternating runs. Reported per run:

    tokens/s   non-padding tokens of the examples consumed / wall time of the training call (both
               counted the same way from the batches each trainer drew; mlx-lm's own figure counts
               loss targets including its extra padding target)
    s/step     wall time / steps
    peak MB    mx.get_peak_memory() of the run
    loss       mean loss on the same held-out examples after the run (exact response-token mask), mean and
               standard deviation over the seeds (the noise a difference is judged against)

The anchor is mlx-lm; the target is >= 1.2x its tokens/s. On an NVIDIA GPU (MLX's CUDA backend, against
PyTorch + PEFT as well): `benchmarks/train_cuda.py`.

    python benchmarks/train.py [--steps 40] [--batch-size 8] [--hidden 128] [--layers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np


def make_data(d: Path, n_train: int, n_valid: int, seed: int = 0) -> None:
    """Prompt/completion records with a wide spread of lengths (about 15 to 130 tokens)."""
    from mlx_bridge.testing.models import WORDS

    rng = random.Random(seed)

    def rec():
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 80)))
        return {"prompt": p, "completion": c}

    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(rec()) + "\n" for _ in range(n)))


def heldout_loss(model, tokenizer, data: Path, batch_size: int) -> float:
    """Exact response-token loss of `model` on valid.jsonl (the same metric for both runs)."""
    from mlx_bridge.train.batching import eval_batches
    from mlx_bridge.train.data import read_json_records
    from mlx_bridge.train.step import loss_sum
    from mlx_bridge.train.templates import tokenize_split

    recs, where = read_json_records(data / "valid.jsonl")
    ex, _ = tokenize_split(recs, where, "completions", "chat_template", tokenizer, True, 10**6, "valid")
    model.eval()
    tot, n = 0.0, 0
    for b in eval_batches(ex, batch_size):
        ls, _ = loss_sum(model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
        tot += ls.item()
        n += b.ntoks
    return tot / n


def run_mlx_lm(model_dir: Path, data: Path, a, seed: int = 0) -> dict:
    """mlx_lm.lora's own path: load, load_dataset, train_model (with its iterate_batches and step)."""
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import load

    out = Path(tempfile.mkdtemp(prefix="mlxlm-adapters-"))
    args = types.SimpleNamespace(**dict(
        CONFIG_DEFAULTS, model=str(model_dir), data=str(data), train=True, num_layers=-1, batch_size=a.batch_size,
        iters=a.steps, learning_rate=a.lr, steps_per_report=a.steps, steps_per_eval=10**9, save_every=10**9,
        max_seq_length=a.max_seq_len, mask_prompt=True, adapter_path=str(out), seed=seed,
        lora_parameters={"rank": 8, "dropout": 0.0, "scale": 20.0}))
    model, tok = load(str(model_dir))
    train_set, _, _ = load_dataset(args, tok)
    # the tokens mlx-lm's iterate_batches draws (it uses numpy's global RNG): replay it with the same seed
    np.random.seed(seed)
    replay = iterate_batches(CacheDataset(train_set), a.batch_size, a.max_seq_len, loop=True)
    real = sum(int(np.array(lengths)[:, 1].sum()) for _, (_, lengths) in zip(range(a.steps), replay))
    np.random.seed(seed)  # what mlx_lm.lora's run() does before training
    mx.reset_peak_memory()
    with contextlib.redirect_stdout(io.StringIO()):  # its panel and progress
        tic = time.perf_counter()
        train_model(args, model, train_set, [])
        dt = time.perf_counter() - tic
    return {"tokens": real, "seconds": dt, "peak": mx.get_peak_memory(),
            "loss": heldout_loss(model, tok, data, a.batch_size)}


def run_bridge(model_dir: Path, data: Path, a, seed: int = 0) -> dict:
    from mlx_bridge.train.trainer import MLXTrainer

    tr = MLXTrainer(str(model_dir), str(data / "train.jsonl"), lora_rank=8, lora_scale=20.0, num_layers=-1,
                    batch_size=a.batch_size, learning_rate=a.lr, max_seq_len=a.max_seq_len, valid_fraction=0.0,
                    seed=seed, quiet=True)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    s = tr.train(iters=a.steps)
    dt = time.perf_counter() - tic
    real = s["input_tokens"] + a.steps * a.batch_size  # input_tokens counts len-1 per example
    return {"tokens": real, "seconds": dt, "peak": mx.get_peak_memory(),
            "loss": heldout_loss(tr.model, tr.tokenizer, data, a.batch_size)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()

    from mlx_bridge.testing import mlx_convert, tiny_hf_model

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    hf, mlx_dir, data = work / "hf", work / "mlx", work / "data"
    if not (mlx_dir / "config.json").exists():
        tiny_hf_model(hf, "llama", hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=max(4, a.hidden // 32),
                      num_key_value_heads=max(2, a.hidden // 64), max_position_embeddings=1024)
        mlx_convert(hf, mlx_dir)
    make_data(data, n_train=400, n_valid=32)
    print(f"model: llama hidden {a.hidden}, {a.layers} layers; data: 400 prompt/completion records; "
          f"batch {a.batch_size}, {a.steps} steps, max_seq_len {a.max_seq_len}; device {mx.default_device()}",
          file=sys.stderr)

    # warm-up (MLX compiles and caches CPU kernels on first use)
    w = argparse.Namespace(**dict(vars(a), steps=3))
    run_mlx_lm(mlx_dir, data, w)
    run_bridge(mlx_dir, data, w)
    results = {"mlx_lm.lora": [], "mlx-bridge train": []}
    for seed in range(a.repeats):  # alternate, so machine load hits both alike
        results["mlx_lm.lora"].append(run_mlx_lm(mlx_dir, data, a, seed))
        results["mlx-bridge train"].append(run_bridge(mlx_dir, data, a, seed))

    print(f"\n| trainer | tokens/s (non-padding) | s/step | peak MB | held-out loss after {a.steps} steps "
          f"(mean ± sd over seeds) |")
    print("|---|---:|---:|---:|---:|")
    tps = {}
    for name, runs in results.items():
        tps[name] = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        sps = statistics.median(r["seconds"] / a.steps for r in runs)
        peak = max(r["peak"] for r in runs) / 2**20
        losses = [r["loss"] for r in runs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {name} | {tps[name]:,.0f} | {sps:.3f} | {peak:.1f} | {statistics.mean(losses):.4f} ± {sd:.4f} |")
    print(f"\nspeed-up: {tps['mlx-bridge train'] / tps['mlx_lm.lora']:.2f}x mlx-lm's tokens/s "
          f"(median of {a.repeats} runs each, seeds 0..{a.repeats - 1}; target >= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
