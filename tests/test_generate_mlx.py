"""The deployed model computes what MLX computed: logits and greedy generations equal mlx-lm's.

Path under test is the product's: MLX model dir (mlx-lm's own converter) -> `export` -> `load`, for every
native arch (the export unstacks MoE experts and writes the rope values MLX used).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlx_bridge.deploy.loader import load
from mlx_bridge.testing.adapters import mlx_logits, probe_ids, shared_zoo

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe"]
PROMPTS = ["give three tips for staying healthy", "what is two plus two ?", "hello"]
CHAT = [{"role": "system", "content": "answer yes or no"}, {"role": "user", "content": "is water good ?"}]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


def exported(zoo, arch):
    from mlx_bridge import export

    out = zoo.root / f"export-{arch}"
    if not (out / "config.json").exists():
        export(zoo.mlx(arch), out, log=lambda *a: None, progress=False, verify=False)
    return out


def mlx_generate(mlx_dir, prompts, max_tokens, messages=None):
    """(text, token ids) of mlx-lm's greedy generation per prompt."""
    from mlx_lm import load as mlx_load, stream_generate

    model, tok = mlx_load(str(mlx_dir))
    out = []
    if messages is not None:
        prompts = [tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)]
    for p in prompts:
        text, ids = "", []
        for r in stream_generate(model, tok, p, max_tokens=max_tokens):
            text += r.text
            ids.append(r.token)
        if r.finish_reason == "stop":
            ids = ids[:-1]  # the EOS token is not part of the completion
        out.append((text, ids))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_mlx(zoo, arch):
    m = load(exported(zoo, arch))
    assert m.backend == "native"
    ids = probe_ids(m.config["vocab_size"], n=2, length=40)  # longer than the sliding windows (32)
    ref = mlx_logits(zoo.mlx(arch), ids)
    got = m.logits(torch.tensor(ids, dtype=torch.long)).numpy()
    diff = np.abs(ref - got)
    assert diff.max() < 1e-4, f"{arch}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_mlx_lm(zoo, arch):
    m = load(exported(zoo, arch))
    # mlx-lm writes tokenizer_class Qwen2Tokenizer for qwen2, which rebuilds the tiny word-level
    # vocabulary as BPE: some prompts encode to nothing there (the same in mlx-lm and here)
    prompts = [p for p in PROMPTS if m.encode_prompt(p)]
    assert len(prompts) >= 2
    ref = mlx_generate(zoo.mlx(arch), prompts, max_tokens=24)
    got = m.complete([m.encode_prompt(p) for p in prompts], max_tokens=24)  # batched, ragged
    for p, (text, ids), c in zip(prompts, ref, got):
        assert c.token_ids == ids, f"{arch} {p!r}"
        assert c.text == text
    assert m.generate(prompts[0], chat=False, max_tokens=24) == ref[0][0]


def test_chat_template_tokens_and_generation_equal_mlx_lm(zoo):
    m = load(exported(zoo, "qwen3"))
    [(text, ids)] = mlx_generate(zoo.mlx("qwen3"), None, max_tokens=16, messages=CHAT)
    assert m.generate(messages=CHAT, max_tokens=16) == text
    assert m.complete([m.encode_prompt(messages=CHAT)], max_tokens=16)[0].token_ids == ids


def test_mlx_dir_of_dense_model_loads_directly(zoo):
    """An unquantized MLX dir of a dense arch is already Hugging Face layout."""
    m = load(zoo.mlx("llama"))
    ref = mlx_generate(zoo.mlx("llama"), PROMPTS[:1], max_tokens=16)
    assert m.generate(PROMPTS[0], chat=False, max_tokens=16) == ref[0][0]
