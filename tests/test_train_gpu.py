"""MLXTrainer on MLX's CUDA backend: LoRA/DoRA/full/QLoRA steps, resume equality, export + verify of a CUDA run.

Marked `gpu` and skipped unless MLX itself has a CUDA device (`pip install "mlx-bridge[train-cuda]"`):
torch seeing a GPU is not enough, the CPU build of MLX would silently train on the CPU.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_bridge.cli import main as cli_main
from mlx_bridge.manifest import Manifest
from mlx_bridge.probes import Probes
from mlx_bridge.testing import mlx_convert, tiny_hf_model
from mlx_bridge.testing.train import write_split_dir
from mlx_bridge.train.backend import backend_info
from mlx_bridge.train.log import TrainLog
from mlx_bridge.train.trainer import MLXTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (hasattr(mx, "cuda") and mx.cuda.is_available()),
    reason="needs MLX's CUDA backend (mlx[cuda13] or mlx[cuda12])")]
FAST = dict(quiet=True, learning_rate=1e-2, batch_size=4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    hf = tiny_hf_model(root / "hf", "llama", seed=1)
    return {"f32": mlx_convert(hf, root / "mlx"),
            "q4": mlx_convert(hf, root / "q4", quantize=True, bits=4, group_size=32)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split_dir(tmp_path_factory.mktemp("data") / "completions", "completions", n_train=24, n_valid=8)


def test_mlx_trains_on_cuda_by_default():
    info = backend_info()
    assert info["backend"] == "cuda" and mx.default_device() == mx.gpu
    assert info["device"] and info["device"] != str(mx.default_device())  # the card's name, e.g. "NVIDIA H200"
    assert info["device_arch"].startswith("sm_")


@pytest.mark.parametrize("kind,base", [("lora", "f32"), ("dora", "f32"), ("full", "f32"), ("lora", "q4"),
                                       ("dora", "q4")])
def test_fine_tune_types_train_on_cuda(bases, data, tmp_path, kind, base):
    from mlx_lm import load

    tr = MLXTrainer(str(bases[base]), str(data), fine_tune_type=kind, lora_rank=4, num_layers=1, **FAST)
    before = tr.evaluate()["loss"]
    s = tr.train(iters=4)
    assert tr.evaluate()["loss"] < before
    flags = [bool(r.get("startup")) for r in tr.log.steps()]
    assert flags[:2] == [True, True]  # step 1 compiles; step 2 again, with the optimizer's state
    assert s["startup_steps"] == sum(flags) and s["startup_seconds"] > 0 and s["steady_steps"] == 4 - sum(flags)
    assert (s["steady_tokens_per_sec"] or 1) > 0 and s["trained_on"] == [f"cuda ({backend_info()['device']})"]
    out = tr.save_checkpoint(tmp_path / kind)
    m = Manifest.load(out)
    assert m.environment["backend"] == "cuda" and m.environment["device"] == backend_info()["device"]
    assert m.training["startup_seconds"] == s["startup_seconds"]
    first = TrainLog.read_jsonl(out / "training_log.jsonl").steps()[0]  # line 0 is the step-0 validation
    assert first["startup"] is True and first["backend"] == "cuda"
    # what mlx-lm computes on CUDA when it loads the checkpoint itself equals the saved probes
    p = Probes.load(out)
    model, _ = load(str(bases[base]), adapter_path=str(out))
    got = np.array(model(mx.array(p.input_ids)).astype(mx.float32))
    np.testing.assert_allclose(got, p.logits, atol=1e-4)


def test_cuda_steps_match_the_cpu(bases, data):
    """The same code on both backends: per-step losses agree (TF32 matmuls on CUDA: ~1e-3 relative).

    At lr 1e-3: at FAST's 1e-2 the trajectory is chaotic (CPU runs whose base weights differ by 1e-3 relative
    noise spread 25% at step 3; an H200 run landed inside that spread), at 1e-3 they spread 0.13% in 4 steps.
    """
    settings = dict(lora_rank=4, seed=3, **{**FAST, "learning_rate": 1e-3})
    gpu = MLXTrainer(str(bases["f32"]), str(data), **settings)
    gpu.train(iters=4)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        cpu = MLXTrainer(str(bases["f32"]), str(data), **settings)
        assert cpu.backend["backend"] == "cpu"
        cpu.train(iters=4)
    finally:
        mx.set_default_device(device)
    a, b = [r["loss"] for r in gpu.log.steps()], [r["loss"] for r in cpu.log.steps()]
    np.testing.assert_allclose(a, b, rtol=1e-2)


def test_resume_on_cuda_equals_the_uninterrupted_run(bases, data, tmp_path):
    """Kill after step 5 (last checkpoint at 4), resume: losses and weights equal the uninterrupted run's."""
    settings = dict(lora_rank=4, lora_dropout=0.1, grad_accum=2, batch_size=3, lr_schedule="cosine", warmup=2,
                    learning_rate=5e-3, save_every=2, quiet=True, seed=7)

    def run(name, **kw):
        t = MLXTrainer(str(bases["f32"]), str(data), out=tmp_path / name, **settings, **kw)
        t.train(iters=8, callbacks=[interrupt] if name == "b" and not kw else [])
        return t

    def interrupt(trainer, record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    full = [r["loss"] for r in run("a").log.steps()]
    again = [r["loss"] for r in run("a2").log.steps()]
    assert again == full, f"two uninterrupted CUDA runs differ: max {np.max(np.abs(np.subtract(again, full))):.3g}"
    with pytest.raises(KeyboardInterrupt):
        run("b")
    c = run("b", resume=True)
    resumed = [r["loss"] for r in c.log.steps()]
    assert resumed == full, f"resumed run differs: max {np.max(np.abs(np.subtract(resumed, full))):.3g}"
    flags = [bool(r.get("startup")) for r in c.log.steps()]
    assert flags[0] and flags[1] and flags[4]  # the first run's two compiling steps; the resumed run's first (step 5)
    assert c.summary()["startup_steps"] == sum(flags)
    wa, wc = mx.load(str(tmp_path / "a" / "adapters.safetensors")), mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wc[k])) for k in wa)


@pytest.mark.parametrize("base", ["f32", "q4"])
def test_cuda_checkpoint_exports_and_verifies(bases, data, tmp_path, capsys, base):
    """`mlx-bridge train` on CUDA -> checkpoint -> HF export -> verify (PyTorch) against the probes made on CUDA."""
    from mlx_bridge.deploy.loader import load
    from mlx_bridge.translate.export import export
    from mlx_bridge.verify import verify

    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    rc = cli_main(["train", "--model", str(bases[base]), "--data", str(data), "--out", str(ckpt), "--iters", "6",
                   "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "4", "--quiet"])
    assert rc == 0
    end = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert end["startup_seconds"] > 0 and end["steady_tokens_per_sec"] > 0 and end["trained_on"][0].startswith("cuda")
    m = Manifest.load(ckpt)
    assert m.environment["backend"] == "cuda"
    p = Probes.load(ckpt)
    assert p.dtype == m.probes["dtype"] == ("tfloat32" if m.environment["tf32"] else "float32")
    export(ckpt, out, format="hf", verify=False, progress=False, log=lambda *a: None)
    for device in ("cpu", "cuda"):  # eager PyTorch (the fast runner's compilation is not what this tests)
        report = verify(out, write=False, model=load(out, device=device, fast=False))
        assert report["passed"], report["summary"]
        assert report["reference"]["dtype"] == p.dtype
