"""Shared by the CPU tests of the Triton kernels: run them through Triton's interpreter, or skip the module."""

import os
import sys

import pytest
import torch


def use_interpreter_or_skip(gpu_tests: str) -> None:
    """Call at module level before importing triton: skips where CUDA is present (`gpu_tests` runs the
    kernels there), where triton was imported without the interpreter, or where triton is absent."""
    if torch.cuda.is_available():
        pytest.skip(f"CUDA present: {gpu_tests} runs the kernels", allow_module_level=True)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton imported before TRITON_INTERPRET was set", allow_module_level=True)
    # read when triton defines its own functions and when a kernel runs; this process has no GPU to use it for
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
