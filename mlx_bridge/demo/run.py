"""The end-to-end demo: fine-tune the shipped base in MLX, export, load in PyTorch, measure both sides.

Stages (each timed):
    data        the task's train/valid/test splits, written as JSONL (`task.make_splits`)
    mlx before  exact match of the base model on the test split (`mlx_lm.load` + greedy generation)
    train       LoRA with `MLXTrainer` (progress bar), then `save_checkpoint` (adapters, manifest, probes,
                loss plot)
    mlx after   exact match with the checkpoint's adapter (`mlx_lm.load(base, adapter_path=checkpoint)`)
    export      `export(checkpoint, "hf")` (the fine-tuned model) and `export(base, "hf")` (for "before")
    load        `mlx_bridge.load(export, device="cpu")` for both
    torch       exact match of both exports in PyTorch (`DeployedModel`, greedy)
    verify      `mlx_bridge.verify.verify(export)`: logits and greedy tokens against the MLX probes

Example:
    >>> res = run_demo("/tmp/demo-out", preset="quick")   # doctest: +SKIP
    >>> res["accuracy"]["mlx"]["after"] > res["accuracy"]["mlx"]["before"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import task
from .evaluate import agreement, evaluate_mlx, evaluate_torch

BASE = Path(__file__).resolve().parent / "assets" / "base"
NO_REMOTE_CODE = {"tokenizer_config": {"trust_remote_code": False}, "trust_remote_code": False}
# what a run writes in its directory
RUN_PATHS = {"data": "data", "checkpoint": "checkpoint", "export": "export", "base_export": "base-export",
             "results": "results.json"}


@dataclass(frozen=True)
class DemoConfig:
    """How big the run is: `default` takes about 1.5 minutes on 2 CPU cores (limit 3), `quick` under a minute."""

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 5e-4
    lora_rank: int = 8
    lora_scale: float = 20.0  # mlx-lm's default
    n_train: int = 2000
    n_valid: int = 64
    n_test: int = 200
    seed: int = 0


PRESETS = {"default": DemoConfig(), "quick": DemoConfig(steps=60, n_test=50)}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def _stage(times: dict, name: str, log):
    log(f"== {name}")
    t0 = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - t0, 2)


def run_demo(out: str | os.PathLike, preset: str = "default", steps: int | None = None, base: str | os.PathLike = BASE,
             log=print) -> dict:
    """Run the whole path in `out` (which must be empty or absent); return the results (also `results.json`).

    Args:
        out: working directory for data, checkpoint, exports and results.
        preset: "default" or "quick" (fewer steps and test examples).
        steps: override the number of LoRA steps.
        base: the MLX base model directory (the one shipped with the package by default).
    Returns:
        {"config", "accuracy": {"mlx"|"pytorch": {"before", "after"}}, "agreement", "parity", "seconds",
         "sizes", "paths"}

    Example:
        >>> run_demo("/tmp/demo", preset="quick")["parity"]["passed"]   # doctest: +SKIP
        True
    """
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    from .. import MLXTrainer, export, load
    from ..verify import verify

    cfg = PRESETS[preset] if steps is None else replace(PRESETS[preset], steps=steps)
    out, base = Path(out), Path(base)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in RUN_PATHS.items()}
    times: dict[str, float] = {}
    mx.random.seed(cfg.seed)

    with _stage(times, "data", log):
        splits = task.make_splits(cfg.seed, cfg.n_train, cfg.n_valid, cfg.n_test)
        task.write_splits(paths["data"], splits)
        test = splits["test"]
        log(f"{len(splits['train'])} train / {len(splits['valid'])} valid / {len(test)} held-out test examples in "
            f"{paths['data']}; e.g. {test[0]['messages'][0]['content']!r} -> {task.answer(test[0])!r}")

    with _stage(times, "mlx before", log):
        model, tok = mlx_load(str(base), **NO_REMOTE_CODE)
        mlx_before = evaluate_mlx(model, tok, test)
        del model
        log(f"MLX, base model: {100 * mlx_before.accuracy:.1f}% exact match")

    with _stage(times, "train", log):
        trainer = MLXTrainer(str(base), str(paths["data"]), lora_rank=cfg.lora_rank, lora_scale=cfg.lora_scale,
                             learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                             eval_every=max(cfg.steps // 6, 1))
        summary = trainer.train(iters=cfg.steps)
    with _stage(times, "save", log):
        trainer.save_checkpoint(paths["checkpoint"])
        del trainer

    with _stage(times, "mlx after", log):
        model, tok = mlx_load(str(base), adapter_path=str(paths["checkpoint"]), **NO_REMOTE_CODE)
        mlx_after = evaluate_mlx(model, tok, test)
        del model
        log(f"MLX, base + adapter: {100 * mlx_after.accuracy:.1f}% exact match")

    with _stage(times, "export", log):
        export(paths["checkpoint"], paths["export"], format="hf", verify=False, progress=False, log=log)
        export(base, paths["base_export"], format="hf", verify=False, progress=False, log=log)

    with _stage(times, "load", log):
        after_model = load(paths["export"], device="cpu")
        before_model = load(paths["base_export"], device="cpu")

    with _stage(times, "pytorch eval", log):
        torch_before = evaluate_torch(before_model, test)
        torch_after = evaluate_torch(after_model, test)
        log(f"PyTorch: base export {100 * torch_before.accuracy:.1f}%, fine-tuned export "
            f"{100 * torch_after.accuracy:.1f}% exact match")

    with _stage(times, "verify", log):
        parity = verify(paths["export"], model=after_model)
        log(parity["summary"])

    results = {
        "config": asdict(cfg), "preset": preset, "base": str(base),
        "accuracy": {"mlx": {"before": mlx_before.accuracy, "after": mlx_after.accuracy},
                     "pytorch": {"before": torch_before.accuracy, "after": torch_after.accuracy}},
        "agreement": {"before": agreement(mlx_before, torch_before), "after": agreement(mlx_after, torch_after)},
        "parity": {"passed": parity["passed"], "max_abs_diff": parity["logits"]["max_abs_diff"],
                   "limit": parity["logits"]["limit"], "greedy_exact": parity["greedy"]["exact"],
                   "greedy_of": parity["greedy"]["of"], "summary": parity["summary"]},
        "training": {k: summary.get(k) for k in ("steps", "final_train_loss", "final_valid_loss", "tokens_per_sec")},
        "examples": [{"prompt": r["messages"][0]["content"], "answer": task.answer(r), "mlx_before": b, "mlx_after": a,
                      "pytorch_after": t} for r, b, a, t in zip(test[:3], mlx_before.texts, mlx_after.texts,
                                                                torch_after.texts)],
        "seconds": times,
        "sizes": {"checkpoint": _size(paths["checkpoint"]), "export": _size(paths["export"])},
        "paths": {k: str(v) for k, v in paths.items()},
    }
    results["seconds"]["total"] = round(sum(times.values()), 2)
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    return results


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _secs(v: float) -> str:
    return f"{v:.1f}s" if v >= 1 else f"{v:.2f}s"


def table(res: dict, files: bool = True) -> str:
    """The demo's summary table (plain text); `files=False` leaves out where the files are."""
    acc, ag, par = res["accuracy"], res["agreement"], res["parity"]
    n, pct = ag["after"]["n"], (lambda x: f"{100 * x:.1f}%")
    rows = [("", "MLX (mlx-lm)", "PyTorch (export)"),
            (f"exact match, base model ({n} held-out)", pct(acc["mlx"]["before"]), pct(acc["pytorch"]["before"])),
            (f"exact match, after {res['config']['steps']} LoRA steps", pct(acc["mlx"]["after"]),
             pct(acc["pytorch"]["after"]))]
    w = max(len(r[0]) for r in rows)
    lines = [f"{a:<{w}}  {b:>14}  {c:>16}" for a, b, c in rows]
    lines += [
        f"same generated tokens in MLX and PyTorch: {ag['before']['same_tokens']}/{n} before, "
        f"{ag['after']['same_tokens']}/{n} after",
        f"parity of the export: max |logit diff| {par['max_abs_diff']:.2e} (limit {par['limit']:.1e}), greedy "
        f"probes {par['greedy_exact']}/{par['greedy_of']} identical: {'PASS' if par['passed'] else 'FAIL'}",
        "time: " + ", ".join(f"{k} {_secs(v)}" for k, v in res["seconds"].items()),
        f"sizes: checkpoint {_mb(res['sizes']['checkpoint'])}, export {_mb(res['sizes']['export'])}",
    ]
    for ex in res["examples"][:2]:
        lines.append(f"e.g. {ex['prompt']!r}: base {task.normalize(ex['mlx_before'])!r}; fine-tuned "
                     f"{task.normalize(ex['mlx_after'])!r} (MLX), {task.normalize(ex['pytorch_after'])!r} (PyTorch)")
    if files:
        p = res["paths"]
        lines += [f"files: {Path(p['results']).parent}", f"  data        {p['data']}",
                  f"  checkpoint  {p['checkpoint']} (adapters, manifest, probes, loss.png)",
                  f"  export      {p['export']} (Hugging Face layout, parity.json)",
                  f"  base export {p['base_export']}", f"  results     {p['results']}"]
    return "\n".join(lines)
