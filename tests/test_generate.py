"""Generation behaviour: batching, backends, EOS, stop strings, streaming, sampling, context, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlx_bridge.cli import main as cli_main
from mlx_bridge.deploy.generation import TextStream
from mlx_bridge.deploy.loader import load
from mlx_bridge.deploy.sampling import apply_top_k, apply_top_p
from mlx_bridge.errors import BridgeError
from mlx_bridge.testing.adapters import shared_zoo

PROMPTS = ["give three tips for staying healthy", "hello", "what is the answer to one plus two ?", "a"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return shared_zoo(tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture(scope="module")
def llama(zoo):
    return load(zoo.hf("llama"))


@pytest.mark.parametrize("arch,backend", [("llama", "native"), ("gemma2", "native"), ("mixtral", "native"),
                                          ("gemma2", "transformers")])
def test_batched_equals_one_by_one(zoo, arch, backend):
    m = load(zoo.hf(arch), backend=backend)
    ids = [m.encode_prompt(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1  # ragged
    batch = m.complete(ids, max_tokens=40, ignore_eos=True)  # 40 > the sliding window (32)
    for i, c in zip(ids, batch):
        alone = m.complete([i], max_tokens=40, ignore_eos=True)[0]
        assert c.token_ids == alone.token_ids and c.text == alone.text
        assert c.prompt_tokens == len(i) and len(c.token_ids) == 40 and c.finish_reason == "length"


@pytest.mark.parametrize("arch", ["phi3", "mixtral"])
def test_native_and_transformers_backends_agree(zoo, arch):
    native, hf = load(zoo.hf(arch)), load(zoo.hf(arch), backend="transformers")
    assert (native.backend, hf.backend) == ("native", "transformers")
    ids = [native.encode_prompt(p) for p in PROMPTS]
    a = native.complete(ids, max_tokens=20, ignore_eos=True)
    b = hf.complete(ids, max_tokens=20, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_eos_ends_a_row_and_is_not_returned(llama):
    ids = llama.encode_prompt(PROMPTS[0])
    free = llama.complete([ids], max_tokens=12, ignore_eos=True)[0].token_ids
    k = next(i for i in range(3, 12) if free[i] not in free[:i])
    saved = llama.eos_token_ids
    try:
        llama.eos_token_ids = {free[k]}
        c = llama.complete([ids, llama.encode_prompt("hello")], max_tokens=12)[0]
    finally:
        llama.eos_token_ids = saved
    assert c.token_ids == free[:k] and c.finish_reason == "stop"
    assert c.text == llama.decode(free[:k])


def test_eos_ids_from_generation_config(zoo, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(zoo.hf("llama"), d)
    g = json.loads((d / "generation_config.json").read_text())
    g["eos_token_id"] = [7, 5]
    (d / "generation_config.json").write_text(json.dumps(g))
    m = load(d)
    assert m.eos_token_ids == {7, 5, m.tokenizer.eos_token_id}


def test_stop_strings_cut_the_text(llama):
    ids = llama.encode_prompt(PROMPTS[0])
    free = llama.complete([ids], max_tokens=16)[0]
    words = free.text.split()
    stop = " " + words[3]
    cut = free.text.find(stop)
    c = llama.complete([ids], max_tokens=16, stop=[stop, "no such text"])[0]
    assert c.text == free.text[:cut] and c.finish_reason == "stop"
    pieces = list(s := llama.stream_ids(ids, max_tokens=16, stop=[stop]))
    assert "".join(pieces) == c.text and s.last_completion.finish_reason == "stop"


def test_stream_pieces_make_the_text(llama):
    msgs = [{"role": "user", "content": "hello"}]
    s = llama.stream(messages=msgs, max_tokens=20)
    pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == llama.generate(messages=msgs, max_tokens=20)
    assert s.last_completion is llama.last_completion and len(s.last_completion.token_ids) <= 20


def test_plain_prompt_goes_through_the_chat_template_like_the_cli(llama, tmp_path):
    """generate("an instruction") = one user message through the template (as `mlx-bridge generate` and
    mlx-lm's CLI do); chat=False continues the raw text; a tokenizer without a template gets raw text."""
    msgs = [{"role": "user", "content": "hello"}]
    assert llama.chat_ids("hello") == llama.encode_prompt(messages=msgs) != llama.encode_prompt("hello")
    assert llama.generate("hello", max_tokens=8) == llama.generate(messages=msgs, max_tokens=8)
    raw = llama.complete([llama.encode_prompt("hello")], max_tokens=8)[0].text
    assert llama.generate("hello", chat=False, max_tokens=8) == raw
    assert "".join(llama.stream("hello", chat=False, max_tokens=8)) == raw
    assert llama.generate(["hello", "a"], max_tokens=8)[0] == llama.generate("hello", max_tokens=8)
    with pytest.raises(BridgeError, match="chat=False"):
        llama.generate(messages=msgs, chat=False)
    template, llama.tokenizer.chat_template = llama.tokenizer.chat_template, None
    try:
        assert llama.generate("hello", max_tokens=8) == raw
        with pytest.raises(BridgeError, match="no chat template"):
            llama.generate("hello", chat=True)
    finally:
        llama.tokenizer.chat_template = template


def test_stream_never_splits_a_character(tmp_path):
    """Byte-level BPE splits multi-byte characters across tokens: no piece may end inside one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["plain words and more words"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    text = "café 🙂 naïve words ü"
    ids = tk.encode(text).ids
    assert any("\ufffd" in tk.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix ends mid-character

    for size in (1, 3):  # one step at a time, and in chunks of 3 steps as the fast runner hands them over
        chunks = [[[t] for t in ids[i:i + size]] for i in range(0, len(ids), size)]
        s = TextStream(iter(chunks), tk.decode, eos=set(), stop=None, prompt_tokens=1, budget=len(ids))
        pieces = list(s)
        assert "".join(pieces) == text == s.last_completion.text
        assert not any("\ufffd" in p for p in pieces)


def test_row_text_in_chunks_equals_step_by_step(llama):
    """Tokens fed a chunk at a time end a row at the same token, with the same text, as one by one."""
    from mlx_bridge.deploy.generation import RowText

    ids = llama.complete([llama.encode_prompt(PROMPTS[0])], max_tokens=30, ignore_eos=True)[0].token_ids
    text = llama.decode(ids)
    stop = [text[len(text) // 2: len(text) // 2 + 2]]  # a stop string in the middle of the text
    eos = {ids[20]}
    for kw in (dict(eos=set(), stop=stop), dict(eos=eos, stop=None), dict(eos=set(), stop=None)):
        ref = RowText(llama.decode, limit=25, **kw)
        want = "".join(ref.add([t]) for t in ids) + ref.close()
        for size in (2, 5, 8):
            row = RowText(llama.decode, limit=25, **kw)
            got = "".join(row.add(ids[i:i + size]) for i in range(0, len(ids), size)) + row.close()
            assert (got, row.ids, row.reason) == (want, ref.ids, ref.reason) == (row.text, ref.ids, ref.reason)


def test_seeded_sampling_is_repeatable(llama):
    ids = [llama.encode_prompt(p) for p in PROMPTS[:2]]
    kw = dict(max_tokens=20, temperature=1.5, ignore_eos=True)
    a = llama.complete(ids, seed=7, **kw)
    assert [c.token_ids for c in a] == [c.token_ids for c in llama.complete(ids, seed=7, **kw)]
    assert [c.token_ids for c in a] != [c.token_ids for c in llama.complete(ids, seed=8, **kw)]
    greedy = llama.complete(ids, max_tokens=20, ignore_eos=True)
    for kw2 in (dict(top_k=1), dict(top_p=1e-6)):  # a single candidate left: sampling is greedy
        got = llama.complete(ids, max_tokens=20, temperature=1.0, seed=3, ignore_eos=True, **kw2)
        assert [c.token_ids for c in got] == [c.token_ids for c in greedy]


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_and_top_k_keep_what_mlx_lm_keeps(top_p):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.sample_utils import apply_top_k as mlx_top_k, apply_top_p as mlx_top_p

    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ours = apply_top_p(torch.tensor(lp), top_p).numpy()
    ref = np.array(mlx_top_p(mx.array(lp), top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    ours_k = apply_top_k(torch.tensor(lp), 7).numpy()
    ref_k = np.array(mlx_top_k(mx.array(lp), 7))
    np.testing.assert_array_equal(np.isfinite(ours_k), np.isfinite(ref_k))


def test_context_limit(zoo):
    m = load(zoo.hf("llama"), max_context=12)
    ids = m.encode_prompt(PROMPTS[0])  # 6 tokens
    c = m.complete([ids], max_tokens=100, ignore_eos=True)[0]
    assert len(c.token_ids) == 12 - len(ids) and c.finish_reason == "length"
    with pytest.raises(BridgeError, match="do not fit the context of 12"):
        m.complete([list(range(5, 17))], max_tokens=1)


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
])
def test_bad_sampling_settings(llama, kw, match):
    with pytest.raises(BridgeError, match=match):
        llama.complete([[5, 6]], **kw)


def test_bad_prompts(llama):
    with pytest.raises(BridgeError, match="empty prompt"):
        llama.complete([[5], []])
    with pytest.raises(BridgeError, match="outside the vocabulary"):
        llama.complete([[5, 10_000]])
    with pytest.raises(BridgeError, match="exactly one"):
        llama.encode_prompt("hi", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BridgeError, match="messages"):
        llama.encode_prompt(messages=["hi"])
    with pytest.raises(BridgeError, match="ids must be in 0..100"):
        llama.logits(torch.tensor([[5, 101]]))


def test_bos_handling_follows_mlx_lm(zoo, tmp_path):
    """A tokenizer that adds BOS: a raw prompt gets it once, also when it already starts with it."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.tokenizer_utils import load as mlx_tokenizer
    from tokenizers import Tokenizer, processors

    d = tmp_path / "bos"
    shutil.copytree(zoo.hf("llama"), d)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(d / "tokenizer.json"))
    m = load(d)
    ref = mlx_tokenizer(d)
    for p in ("hello", "<s> hello"):
        add = ref.bos_token is None or not p.startswith(ref.bos_token)  # mlx_lm.stream_generate's rule
        assert m.encode_prompt(p) == ref.encode(p, add_special_tokens=add)
        assert m.encode_prompt(p).count(1) == 1


def test_cli_generate(zoo, capsys):
    d = zoo.hf("llama")
    m = load(d)
    assert cli_main(["generate", str(d), "--prompt", "hello", "--max-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == m.generate(messages=[{"role": "user", "content": "hello"}], max_tokens=8) + "\n"
    assert cli_main(["generate", str(d), "--prompt", "hello", "--max-tokens", "8", "--ignore-chat-template",
                     "--temperature", "0.8", "--seed", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == m.generate("hello", chat=False, max_tokens=8, temperature=0.8, seed=4) + "\n"
    assert cli_main(["generate", str(d), "--prompt", "hello", "--max-tokens", "8", "--system-prompt", "be brief",
                     "--device", "cpu"]) == 0
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert capsys.readouterr().out == m.generate(messages=msgs, max_tokens=8) + "\n"


@pytest.mark.parametrize("think", [False, True])
def test_chat_template_gets_enable_thinking_as_mlx_lm_passes_it(zoo, tmp_path, think):
    pytest.importorskip("mlx_lm")
    from mlx_lm.tokenizer_utils import load as mlx_tokenizer
    from tokenizers import Tokenizer

    d = tmp_path / "think"
    shutil.copytree(zoo.hf("llama"), d)
    if think:
        tk = Tokenizer.from_file(str(d / "tokenizer.json"))
        tk.add_special_tokens(["<think>", "</think>"])
        tk.save(str(d / "tokenizer.json"))
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if enable_thinking is defined and enable_thinking %}yes{% else %}no{% endif %}")
    msgs = [{"role": "user", "content": "hello"}]
    ref = mlx_tokenizer(d)
    expected = ref.encode(ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    m = load(d)
    assert m.encode_prompt(messages=msgs) == expected
    assert m.decode(expected).endswith("yes" if think else "no")
    flipped = m.encode_prompt(messages=msgs, chat_template_kwargs={"enable_thinking": not think})
    assert m.decode(flipped).endswith("no" if think else "yes")
