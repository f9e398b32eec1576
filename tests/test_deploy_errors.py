"""Bad input to `load` and the deploy CLI: one clear line naming the file/key, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlx_bridge.cli import main as cli_main
from mlx_bridge.deploy.loader import load
from mlx_bridge.errors import BridgeError
from mlx_bridge.testing.adapters import shared_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture
def copy(zoo, tmp_path):
    def make(arch="llama"):
        d = tmp_path / arch
        shutil.copytree(zoo.hf(arch), d)
        return d
    return make


def rewrite_weights(d, edit):
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_not_a_directory(tmp_path):
    with pytest.raises(BridgeError, match="not a directory"):
        load(tmp_path / "nope")


def test_missing_config(copy):
    d = copy()
    (d / "config.json").unlink()
    with pytest.raises(BridgeError, match="not an export: no config.json"):
        load(d)


def test_peft_dir_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(BridgeError, match="PEFT adapter"):
        load(tmp_path)


def test_checkpoint_dir_is_named(tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(BridgeError, match="an MLX checkpoint: run `mlx-bridge export"):
        load(tmp_path)


def test_invalid_config_json(copy):
    d = copy()
    (d / "config.json").write_text("{not json")
    with pytest.raises(BridgeError, match="config.json: not valid JSON"):
        load(d)


def test_missing_weights(copy):
    d = copy()
    (d / "model.safetensors").unlink()
    with pytest.raises(BridgeError, match="no model.safetensors or model.safetensors.index.json"):
        load(d)


def test_pickle_weights_are_refused(copy):
    d = copy()
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(BridgeError, match="pickle"):
        load(d)


def test_index_naming_absent_shard(copy):
    d = copy()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(BridgeError, match="model-00001-of-00002.safetensors"):
        load(d)


def test_missing_unexpected_and_misshapen_tensors_all_listed(copy):
    d = copy()

    def edit(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]
        sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)
        sd["model.norm.weight"] = torch.zeros(65)

    rewrite_weights(d, edit)
    with pytest.raises(BridgeError) as e:
        load(d)
    msg = str(e.value)
    assert "3 problems" in msg and "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight has shape [65], the config implies [64]" in msg


def test_quantized_mlx_dir_is_refused(zoo):
    pytest.importorskip("mlx_lm")
    with pytest.raises(BridgeError, match="quantization.*mlx-bridge export"):
        load(zoo.mlx("llama", quant={"bits": 4, "group_size": 64}))


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int8"), "dtype 'int8'"), (dict(backend="vllm"), "backend 'vllm'"),
    (dict(device="tpu"), "device 'tpu'"),
])
def test_bad_options(zoo, kw, match):
    with pytest.raises(BridgeError, match=match):
        load(zoo.hf("llama"), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(zoo):
    with pytest.raises(BridgeError, match="CUDA is not available"):
        load(zoo.hf("llama"), device="cuda")


def test_native_backend_for_an_arch_it_lacks(zoo):
    d = zoo.hf("olmo2")
    with pytest.raises(BridgeError, match="no native class for it: model_type 'olmo2'"):
        load(d, backend="native")
    with pytest.warns(UserWarning, match="olmo2"):
        m = load(d)
    assert m.backend == "transformers" and isinstance(m.generate("hello", max_tokens=3), str)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
