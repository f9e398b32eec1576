"""The demo: its data generator, the shipped base model, and the quick end-to-end run (through the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_bridge.demo import task
from mlx_bridge.demo.run import BASE


# -- data -------------------------------------------------------------------------------------------------

def test_splits_are_deterministic_and_held_out():
    a, b = task.make_splits(7, 300, 30, 50), task.make_splits(7, 300, 30, 50)
    assert a == b
    assert task.make_splits(8, 300, 30, 50)["train"] != a["train"]
    lists = {k: [tuple(task.items_of(r)) for r in v] for k, v in a.items()}
    assert all(task.is_heldout(list(x)) for x in lists["test"])
    assert not any(task.is_heldout(list(x)) for x in lists["train"] + lists["valid"])
    assert len(set(lists["train"]) | set(lists["valid"]) | set(lists["test"])) == 380  # no list twice
    for r in a["test"]:
        assert task.answer(r) == " ".join(reversed(task.items_of(r)))
        assert task.MIN_LEN <= len(task.items_of(r)) <= task.MAX_LEN


def test_corpus_is_deterministic_and_never_shows_the_task():
    docs = task.corpus(2000, seed=0)
    assert docs == task.corpus(2000, seed=0) and docs != task.corpus(2000, seed=1)
    instruction = task.INSTRUCTION.split("{")[0].lower().strip()
    for d in docs:
        assert instruction not in d and "<|" not in d
    # no held-out list appears in the corpus, in either direction
    words = set(task.ITEMS)
    for d in docs[:500]:
        runs, cur = [], []
        for w in d.split() + ["."]:
            if w in words:
                cur.append(w)
            elif cur:
                runs.append(cur)
                cur = []
        assert runs and not any(task.is_heldout(r) or task.is_heldout(r[::-1]) for r in runs)


def test_exact_match_and_written_splits(tmp_path):
    recs = task.make_splits(0, 4, 2, 3)
    task.write_splits(tmp_path, recs)
    back = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert back == recs["test"]
    answers = [task.answer(r) for r in back]
    assert task.exact_match(answers, back) == 1.0
    assert task.exact_match([a.upper() + " </s>" for a in answers], back) == 1.0  # case, end marker
    assert task.exact_match([a + " cat" for a in answers], back) == 0.0
    with pytest.raises(ValueError):
        task.exact_match(answers[:1], back)


# -- the shipped base model -------------------------------------------------------------------------------

def test_base_model_is_small_and_described():
    from mlx_bridge.hashing import check_hashes
    from mlx_bridge.manifest import Manifest

    size = sum(p.stat().st_size for p in BASE.iterdir())
    assert size < 8e6
    m = Manifest.load(BASE)
    assert m.kind == "base" and m.architecture["model_type"] == "llama"
    assert m.recipe["script"] == "scripts/make_demo_base.py" and "seed" in m.recipe
    assert m.files and check_hashes(BASE, m.files)  # a schema-1 manifest: its sha256, checked as sha256


def test_base_model_loads_in_mlx_lm_and_transformers_alike():
    import mlx.core as mx
    import torch
    from mlx_lm import load as mlx_load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = mlx_load(str(BASE))
    hf = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(BASE))
    text = "the reverse of cat sun red fig is"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    ref = np.array(model(mx.array([ids])))
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits.numpy()
    assert np.abs(ref - got).max() < 1e-3
    # the base knows the skill in its pretraining form ...
    out = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):]
    assert hf_tok.decode(out, skip_special_tokens=True).split() == ["fig", "red", "sun", "cat"]
    # ... and its chat template is the one the demo's prompts use
    msgs = task.record(["cat", "sun"])["messages"][:1]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False).endswith("<|assistant|> ")


# -- the quick demo, end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    from mlx_bridge.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"  # the README's `mlx-bridge demo --out demo`
    code = main(["demo", "--quick", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow  # the quick demo trains 60 steps (about 20 s alone, minutes on a busy machine)
def test_quick_demo_gains_tens_of_points_on_both_sides(quick_demo):
    code, out, res = quick_demo
    assert code == 0
    acc = res["accuracy"]
    for side in ("mlx", "pytorch"):
        assert acc[side]["before"] <= 0.1
        assert acc[side]["after"] - acc[side]["before"] >= 0.3, acc
    assert acc["mlx"] == acc["pytorch"]
    for when in ("before", "after"):
        ag = res["agreement"][when]
        assert ag["same_prompts"] == ag["n"]
        assert ag["same_tokens"] == ag["n"], ag["differ"]


@pytest.mark.slow
def test_quick_demo_parity_and_files(quick_demo):
    _, out, res = quick_demo
    assert res["parity"]["passed"] and res["parity"]["max_abs_diff"] < 1e-3
    assert res["parity"]["greedy_exact"] == res["parity"]["greedy_of"]
    parity = json.loads((out / "export" / "parity.json").read_text())
    assert parity["passed"]
    for f in ("adapters.safetensors", "adapter_config.json", "manifest.json", "probes.safetensors", "loss.png",
              "training_log.jsonl"):
        assert (out / "checkpoint" / f).is_file(), f
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "manifest.json"):
        assert (out / "export" / f).is_file(), f
    assert json.loads((out / "export" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert set(res["seconds"]) >= {"train", "export", "load", "verify", "total"}


def test_demo_refuses_bad_arguments(tmp_path, capsys):
    from mlx_bridge.cli import main

    assert main(["demo", "--steps", "0"]) == 2
    (tmp_path / "x").write_text("occupied")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_readme_python_example_on_the_demo_gives_the_fine_tuned_answer(quick_demo, monkeypatch, capsys):
    """The README's demo snippet, run as written (from the directory where `mlx-bridge demo --out demo`
    ran), prints what the README says it prints: the reversed list, which the base model gets wrong."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    demo = readme[readme.index("## Demo"):readme.index("\n## ", readme.index("## Demo") + 1)]
    code, shown = re.findall(r"```python\n(.*?)```\n```\n(.*?)```", demo, re.S)[0]
    _, out, _ = quick_demo
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed == shown and printed.strip() == "blue bat lime"
    from mlx_bridge import load

    base = load(out / "base-export").generate("Reverse the order of these words: lime bat blue")
    assert base.strip() != "blue bat lime"  # the answer is the fine-tuning's
