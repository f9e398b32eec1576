"""Training speed on one NVIDIA GPU: `mlx-bridge train` (MLX's CUDA backend) vs PyTorch + PEFT vs `mlx_lm.lora`.

The anchor is PyTorch + PEFT; the target is steady-state tokens/s >= 1.0x its figure, with the start-up
cost stated. All three train the same model, in one process, one after another:

    model   TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads, vocab 32000),
            bfloat16, random weights (one safetensors file, loaded by all three)
    adapter LoRA rank 16, alpha 32 (scale 2), dropout 0, on all seven linear layers of every block
    data    texts of exactly --seq-len tokens (EOS included), so no trainer pads; batch --batch-size;
            Adam (PyTorch: AdamW with weight decay 0), lr 1e-4, constant
    runs    1. mlx-bridge train   the process's first MLX training step: its kernels are built now
                                  (NVRTC), unless MLX's PTX cache (MLX_PTX_CACHE_DIR) already holds them
            2. mlx_lm.lora        mlx-lm's own train_model, after run 1 (kernels it shares are built)
            3. mlx-bridge train   again, warm: the start-up of a second run on the same machine
            4. PyTorch + PEFT     eager, SDPA attention (transformers' default)

Per run: start-up = wall time of the first two optimizer steps (MLX traces and compiles the step on the
first and again on the second, once the optimizer's state exists; kernel builds; cuBLAS set-up), the
same two steps for every trainer; steady tokens/s = loss-target tokens of the other steps / their wall time, every step
synchronised (MLX evaluates each step; PyTorch: torch.cuda.synchronize()); peak = the framework's own
peak of allocated GPU memory.

    python benchmarks/train_cuda.py [--steps 30] [--batch-size 8] [--seq-len 512] [--layers 22] [--json OUT]
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

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
RANK, ALPHA = 16, 32.0
TORCH_DEVICE = "cuda"


def tinyllama_config(layers: int) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def make_model(d: Path, layers: int) -> None:
    """A random bf16 model of TinyLlama's shape in mlx-lm's layout (= the HF names) + the tiny tokenizer."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    from mlx_bridge.testing.models import tiny_tokenizer

    cfg = tinyllama_config(layers)
    tiny_tokenizer(d)
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())), {"format": "mlx"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def make_data(d: Path, n: int, seq_len: int, seed: int = 0) -> None:
    """`n` texts of seq_len - 1 words (+ EOS = seq_len tokens with the word-level tokenizer); valid: 8 more."""
    from mlx_bridge.testing.models import WORDS

    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, k in (("train", n), ("valid", 8)):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(seq_len - 1))} for _ in range(k)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def result(name: str, seconds: list[float], targets_per_step: int, peak_bytes: int) -> dict:
    """Start-up is the first two steps for every trainer: MLX traces and compiles the step twice
    (without, then with the optimizer's state), as the trainer's own `startup` records say."""
    steady = seconds[2:]
    return {"trainer": name, "startup_s": seconds[0] + seconds[1], "steady_tokens_per_sec": targets_per_step * len(steady) / sum(steady),
            "steady_s_per_step": statistics.median(steady), "steps": len(seconds), "peak_gb": peak_bytes / 1e9,
            "step_seconds": [round(s, 4) for s in seconds]}  # a retrace shows as a slow step after the first


def run_bridge(model_dir: Path, data: Path, a, name: str) -> dict:
    from mlx_bridge.train.trainer import MLXTrainer

    tr = MLXTrainer(str(model_dir), str(data / "train.jsonl"), lora_rank=RANK, lora_alpha=ALPHA, targets=TARGETS,
                    batch_size=a.batch_size, learning_rate=a.lr, max_seq_len=2048, valid_fraction=0.0, quiet=True)
    assert tr.backend["backend"] == "cuda", tr.backend
    mx.reset_peak_memory()
    s = tr.train(iters=a.steps)
    steps = tr.log.steps()
    assert all(r["tokens"] == a.batch_size * (a.seq_len - 1) for r in steps), "texts must not pad"
    r = result(name, [r["seconds"] for r in steps], steps[0]["tokens"], mx.get_peak_memory())
    r.update(own_startup_s=s["startup_seconds"], own_steady_tokens_per_sec=s["steady_tokens_per_sec"],
             final_loss=steps[-1]["loss"], device=tr.backend["device"])
    del tr
    mx.clear_cache()
    return r


def run_mlx_lm(model_dir: Path, data: Path, a) -> dict:
    """mlx_lm.lora's own path: load, load_dataset, train_model; per-step time from its reports (every step)."""
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    class Times(TrainingCallback):
        def __init__(self):
            self.seconds, self.loss = [], None

        def on_train_loss_report(self, info):
            self.seconds.append(1.0 / info["iterations_per_second"])  # steps_per_report = 1: this step's time
            self.loss = info["train_loss"]

    out = Path(tempfile.mkdtemp(prefix="mlxlm-adapters-"))
    args = types.SimpleNamespace(**dict(
        CONFIG_DEFAULTS, model=str(model_dir), data=str(data), train=True, num_layers=-1, batch_size=a.batch_size,
        iters=a.steps, learning_rate=a.lr, steps_per_report=1, steps_per_eval=10**9, save_every=10**9,
        max_seq_length=2048, adapter_path=str(out),
        lora_parameters={"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK, "keys": TARGETS}))
    model, tok = load(str(model_dir))
    train_set, _, _ = load_dataset(args, tok)
    cb = Times()
    mx.reset_peak_memory()
    with contextlib.redirect_stdout(io.StringIO()):  # its panel and progress
        train_model(args, model, train_set, [], training_callback=cb)
    r = result("mlx_lm.lora", cb.seconds, a.batch_size * (a.seq_len - 1), mx.get_peak_memory())
    r["final_loss"] = cb.loss
    del model
    mx.clear_cache()
    return r


def run_peft(model_dir: Path, data: Path, a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    ids = torch.tensor([tok.encode(t) + [tok.eos_token_id] for t in texts])
    assert ids.shape[1] == a.seq_len, ids.shape
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map=TORCH_DEVICE)
    sync = torch.cuda.synchronize if TORCH_DEVICE == "cuda" else (lambda: None)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=[t.split(".")[-1] for t in TARGETS]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    model.train()
    if TORCH_DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = [], None
    for step in range(a.steps):
        x = ids[(step * a.batch_size) % len(ids):][:a.batch_size].to(TORCH_DEVICE)
        sync()
        tic = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()  # synchronises
        sync()
        seconds.append(time.perf_counter() - tic)
    cuda = TORCH_DEVICE == "cuda"
    r = result("PyTorch + PEFT", seconds, a.batch_size * (a.seq_len - 1), torch.cuda.max_memory_allocated() if cuda else 0)
    r.update(final_loss=loss, device=torch.cuda.get_device_name() if cuda else "cpu")
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--skip", default="", help="comma-separated runs to leave out: bridge,mlx_lm,peft (debugging)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))

    from mlx_bridge.train.backend import backend_info

    info = backend_info()
    if info["backend"] != "cuda":
        print(f"train_cuda: MLX's default device is {info['backend']}, not CUDA (pip install 'mlx-bridge[train-cuda]')",
              file=sys.stderr)
        return 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-cuda-"))
    model_dir, data = work / "model", work / "data"
    tic = time.perf_counter()
    if not (model_dir / "config.json").exists():
        make_model(model_dir, a.layers)
    make_data(data, n=max(64, a.steps * a.batch_size), seq_len=a.seq_len)
    print(f"device: {info['device']} ({info.get('device_arch')}), MLX {mx.__version__}; model: TinyLlama-1.1B shape, "
          f"{a.layers} blocks, bf16, random; LoRA r{RANK} alpha {ALPHA:g} on {len(TARGETS)} linears x all blocks; "
          f"batch {a.batch_size} x {a.seq_len} tokens, {a.steps} steps (made in {time.perf_counter() - tic:.1f} s)",
          file=sys.stderr, flush=True)

    runs = []

    def done(r):
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "step_seconds"}), file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"device": info, "args": vars(a), "runs": runs}, indent=2) + "\n")

    if "bridge" not in skip:
        done(run_bridge(model_dir, data, a, "mlx-bridge train (first MLX run)"))
    if "mlx_lm" not in skip:
        done(run_mlx_lm(model_dir, data, a))
    if "bridge" not in skip:
        done(run_bridge(model_dir, data, a, "mlx-bridge train (second run)"))
    if "peft" not in skip:
        done(run_peft(model_dir, data, a))

    print(f"\n{info['device']}: TinyLlama-1.1B shape, bf16, LoRA r{RANK} on all linears, batch {a.batch_size} x "
          f"{a.seq_len} tokens, {a.steps} steps\n")
    print("| trainer | steady tokens/s | s/step (median) | start-up: steps 1-2 (s) | peak GPU GB | loss at last step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['trainer']} | {r['steady_tokens_per_sec']:,.0f} | {r['steady_s_per_step']:.4f} | "
              f"{r['startup_s']:.1f} | {r['peak_gb']:.1f} | {r['final_loss']:.4f} |")
    anchor = next((r for r in runs if r["trainer"] == "PyTorch + PEFT"), None)
    if anchor:
        for r in runs:
            if r is not anchor:
                print(f"{r['trainer']}: {r['steady_tokens_per_sec'] / anchor['steady_tokens_per_sec']:.2f}x "
                      f"PyTorch + PEFT's steady tokens/s (target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
