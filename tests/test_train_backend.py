"""Backend detection, start-up vs steady-state accounting, missing-kernel refusal, TF32-labelled probes (CPU)."""

import json

import mlx.core as mx
import pytest

from mlx_bridge.cli import main as cli_main
from mlx_bridge.errors import BridgeError
from mlx_bridge.manifest import Manifest
from mlx_bridge.testing import mlx_convert, tiny_hf_model
from mlx_bridge.testing.train import write_split_dir
from mlx_bridge.train import backend
from mlx_bridge.train.log import speed
from mlx_bridge.verify.parity import coarser, tolerance


def test_backend_info_names_the_backend_and_device():
    info = backend.backend_info(mx.cpu)
    assert info["backend"] == "cpu" and info["device"] and "tf32" not in info
    assert backend.describe(info).startswith("cpu (")
    expected = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "cpu"
    assert backend.backend_info()["backend"] == expected


def test_speed_keeps_startup_apart():
    steps = [{"seconds": 30.0, "input_tokens": 10, "startup": True}, {"seconds": 1.0, "input_tokens": 100},
             {"seconds": 3.0, "input_tokens": 300}, {"seconds": 20.0, "input_tokens": 10, "startup": True},
             {"seconds": 1.0, "input_tokens": 100}]
    assert speed(steps) == {"startup_seconds": 50.0, "startup_steps": 2, "steady_tokens_per_sec": 100.0,
                            "steady_steps": 3}
    assert speed([])["steady_tokens_per_sec"] is None


def test_a_missing_kernel_is_refused_by_name():
    with pytest.raises(BridgeError, match=r"on .* has no kernel for this run: \[quantized_matmul\] No implementation "
                                          r"for problem shape: 8x32x33x1.*\(QLoRA with these quantization"):
        with backend.refuse_missing_kernels():
            raise RuntimeError("[quantized_matmul] No implementation for problem shape: 8x32x33x1, transpose: true\n"
                               "more detail")
    with pytest.raises(RuntimeError, match="out of memory"):  # anything else passes through unchanged
        with backend.refuse_missing_kernels():
            raise RuntimeError("[malloc] out of memory")


def test_probes_of_float32_on_cuda_are_tf32(monkeypatch):
    monkeypatch.setattr(backend, "backend_name", lambda device=None: "cuda")
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert backend.probe_dtype("float32") == "tfloat32" and backend.probe_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert backend.probe_dtype("float32") == "float32"
    monkeypatch.setattr(backend, "backend_name", lambda device=None: "metal")
    monkeypatch.delenv("MLX_ENABLE_TF32")
    assert backend.probe_dtype("float32") == "float32"
    # verify compares a float32 export against TF32 probes at float16's precision
    assert coarser("tfloat32", "float32") == "tfloat32" and tolerance("float32", "tfloat32") == tolerance("float16")
    assert coarser("tfloat32", "bfloat16") == "bfloat16"


def cli_train(tmp_path, *flags: str):
    """`mlx-bridge train` 3 steps of a tiny llama LoRA; the checkpoint dir."""
    hf = tiny_hf_model(tmp_path / "hf", "llama", seed=1)
    base = mlx_convert(hf, tmp_path / "mlx")
    data = write_split_dir(tmp_path / "data", "completions", n_train=12, n_valid=4)
    out = tmp_path / "ckpt"
    assert cli_main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--iters", "3",
                     "--lora-rank", "2", "--batch-size", "4", "--quiet", *flags]) == 0
    return out


def test_cli_run_reports_startup_steady_and_backend(tmp_path, capsys):
    out = cli_train(tmp_path, "--no-compile")
    end = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    info = backend.backend_info()
    assert end["trained_on"] == [f"{info['backend']} ({info['device']})"]
    assert end["startup_seconds"] > 0 and end["steady_tokens_per_sec"] > 0
    m = Manifest.load(out)
    assert m.environment["backend"] == info["backend"] and m.environment["device"] == info["device"]
    assert m.training["startup_steps"] == 1 and m.training["steady_steps"] == 2
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [bool(r.get("startup")) for r in steps] == [True, False, False]
    assert steps[0]["backend"] == info["backend"] and steps[0]["device"] == info["device"]


def test_stepper_counts_the_traces_that_compile_the_step():
    """mx.compile traces the step on the first call, again on the second (the optimizer's state exists
    now) and on each new batch shape; those steps are start-up, not steady state."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_bridge.train.step import Stepper

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

        def __call__(self, x):
            return self.out(self.emb(x))

    model = Tiny()
    st = Stepper(model, optim.Adam(learning_rate=1e-3))
    seen = []
    for L in (4, 4, 4, 8, 8, 4):
        x = mx.zeros((2, L), mx.int32)
        st.micro(x, x, mx.ones((2, L)), last=True)
        seen.append(st.traces)
    assert seen == [1, 2, 2, 3, 3, 3]
    eager = Stepper(model, optim.Adam(learning_rate=1e-3), compile=False)
    eager.micro(x, x, mx.ones((2, 4)), last=True)
    assert eager.traces == 0


def test_compiled_run_counts_the_retrace_as_startup(tmp_path):
    out = cli_train(tmp_path)
    steps = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    flags = [bool(r.get("startup")) for r in steps if "loss" in r]
    assert flags[:2] == [True, True]  # step 1 compiles, step 2 compiles again with the optimizer's state
    m = Manifest.load(out)
    assert m.training["startup_steps"] == sum(flags) and m.training["steady_steps"] == 3 - sum(flags)
