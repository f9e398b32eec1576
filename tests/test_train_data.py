"""Training data: formats, templates, exact loss masks, batching, settings and bad input (no model needed)."""

import argparse
import json

import numpy as np
import pytest

from mlx_bridge.errors import BridgeError
from mlx_bridge.testing import tiny_tokenizer
from mlx_bridge.testing.train import task_records, write_records, write_split_dir
from mlx_bridge.train.batching import BatchStream, collate, epoch_order
from mlx_bridge.train.config import TrainConfig, load_yaml, make_config
from mlx_bridge.train.data import check_records, hold_out, read_records
from mlx_bridge.train.dataset import prepare
from mlx_bridge.train.templates import Example, encode_record, tokenize_split


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def targets_text(tok, ex: Example) -> str:
    return tok.decode(ex.tokens[ex.mask].tolist())


# ------------------------------------------------------------------ formats and masks
@pytest.mark.parametrize("fmt", ["alpaca", "chat", "completions", "text"])
def test_format_detected_from_records(tmp_path, fmt):
    p = write_records(tmp_path / "d.jsonl", task_records(fmt, 6))
    recs = read_records(p)
    assert check_records(recs, None) == fmt


def test_completions_mask_is_exactly_the_response(tok):
    ex = encode_record({"prompt": "give three tips", "completion": "eat sleep walk"}, "completions",
                       "chat_template", tok, True)
    # the chat template renders "<|user|> ... <|end|> <|assistant|> eat sleep walk <|end|>"
    assert targets_text(tok, ex) == "eat sleep walk <|end|>"
    assert not ex.mask[0]
    full = encode_record({"prompt": "give three tips", "completion": "eat sleep walk"}, "completions",
                         "chat_template", tok, False)
    assert full.mask[1:].all() and not full.mask[0]


def test_alpaca_with_chat_template_and_with_alpaca_prompt(tok):
    r = {"instruction": "reverse the list", "input": "one two", "output": "two one"}
    ex = encode_record(r, "alpaca", "chat_template", tok, True)
    assert targets_text(tok, ex) == "two one <|end|>"
    assert "one two" in tok.decode(ex.tokens.tolist())
    ex = encode_record(r, "alpaca", "alpaca", tok, True)  # prompt text, then output and EOS
    assert ex.tokens[-1] == tok.eos_token_id
    assert targets_text(tok, ex) == "two one </s>"


def test_chat_trains_every_assistant_turn_and_passes_tools(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what"}, {"role": "assistant", "content": "yes no"}]
    ex = encode_record({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]},
                       "chat", "chat_template", tok, True)
    assert targets_text(tok, ex) == "hello <|end|> yes no <|end|>"


def test_text_trains_every_token_and_appends_eos(tok):
    ex = encode_record({"text": "hello world"}, "text", "text", tok, False)
    assert ex.tokens[-1] == tok.eos_token_id
    assert ex.mask.tolist() == [False] + [True] * (len(ex.tokens) - 1)


def test_masks_match_mlx_lm_offsets(tok):
    """Tokens equal mlx-lm's datasets; our first target is mlx-lm's prompt offset (reference check)."""
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset

    comp = task_records("completions", 5)
    ref = CompletionsDataset(comp, tok, "prompt", "completion", mask_prompt=True)
    chat = task_records("chat", 5, seed=3)
    ref_chat = ChatDataset(chat, tok, mask_prompt=True)
    for recs, fmt, r in ((comp, "completions", ref), (chat, "chat", ref_chat)):
        for i, rec in enumerate(recs):
            tokens, offset = r.process(r[i])
            ex = encode_record(rec, fmt, "chat_template", tok, True)
            assert ex.tokens.tolist() == list(tokens)
            assert ex.mask.tolist() == [j >= offset for j in range(len(tokens))]


def test_collate_never_counts_padding():
    exs = [Example(np.arange(1, n + 1, dtype=np.int32), np.arange(n) >= 2) for n in (4, 9, 6)]
    b = collate(exs, [0, 1, 2], pad_multiple=8)
    assert b.inputs.shape == (3, 8) and b.targets.shape == (3, 8)
    assert b.ntoks == sum(int(e.mask.sum()) for e in exs) == b.mask.sum()
    for j, e in enumerate(exs):
        n = len(e.tokens)
        assert b.mask[j, n - 1:].sum() == 0  # no target at or after the padding
        assert (b.targets[j, :n - 1] == e.tokens[1:]).all()
        assert b.mask[j, :n - 1].tolist() == e.mask[1:].tolist()


def test_epoch_order_covers_each_example_once_and_buckets_lengths():
    lengths = np.random.default_rng(0).integers(5, 200, size=103)
    batches = epoch_order(lengths, 8, seed=1, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_order(lengths, 8, 1, 0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_order(lengths, 8, 1, 1)]
    exs = [Example(np.zeros(n, np.int32), np.ones(n, bool)) for n in lengths]
    stream = BatchStream(exs, 8, seed=1, pad_multiple=1)
    padded = sum(stream.batch(i).inputs.size for i in range(stream.per_epoch))
    real = sum(int(n) - 1 for n in lengths)
    assert padded < 1.1 * real  # sorted windows: little padding


# ------------------------------------------------------------------ sources and splits
def test_directory_splits_and_seeded_holdout(tmp_path, tok):
    d = write_split_dir(tmp_path / "dir", "completions", n_train=10, n_valid=3, n_test=2)
    td = prepare(str(d), tok, TrainConfig())
    assert td.info["counts"] == {"train": 10, "valid": 3, "test": 2}
    assert td.info["format"] == "completions" and td.info["template"] == "chat_template"
    assert set(td.info["files"]) == {"train.jsonl", "valid.jsonl", "test.jsonl"} and len(td.info["sha256"]) == 64
    f = write_records(tmp_path / "one.json", task_records("alpaca", 20))
    a = prepare(str(f), tok, TrainConfig(seed=3))
    b = prepare(str(f), tok, TrainConfig(seed=3))
    assert a.info["counts"] == {"train": 18, "valid": 2, "test": 0}
    assert [e.tokens.tolist() for e in a.examples["valid"]] == [e.tokens.tolist() for e in b.examples["valid"]]
    assert a.info["valid_held_out"] == {"fraction": 0.1, "seed": 3}
    recs = hold_out(read_records(f), 0.0, 0)
    assert "valid" not in recs.splits


def test_in_memory_records(tok):
    td = prepare({"train": task_records("text", 6), "valid": task_records("text", 2)}, tok, TrainConfig())
    assert td.info["format"] == "text" and td.info["mask_prompt"] is False


# ------------------------------------------------------------------ bad input
def test_bad_jsonl_names_the_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(BridgeError, match=r"train.jsonl:2: not valid JSON"):
        read_records(p)
    q = tmp_path / "x.json"
    q.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(BridgeError, match=r"x.json:2: not valid JSON"):
        read_records(q)


def test_missing_fields_are_all_listed(tmp_path):
    recs = task_records("alpaca", 4)
    del recs[1]["output"]
    recs[3]["input"] = 5
    p = write_records(tmp_path / "d.jsonl", recs)
    with pytest.raises(BridgeError) as e:
        check_records(read_records(p), None)
    msg = str(e.value)
    assert "d.jsonl:2: missing field 'output' (alpaca format)" in msg
    assert "d.jsonl:4: field 'input' must be a string" in msg and "\n" not in msg


def test_unknown_record_shape_and_empty_split(tmp_path):
    p = write_records(tmp_path / "d.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(BridgeError, match=r"d.jsonl:1: record has fields \['answer', 'question'\]"):
        check_records(read_records(p), None)
    d = write_split_dir(tmp_path / "dir", "text", n_train=4, n_valid=0)
    (d / "valid.jsonl").write_text("")
    with pytest.raises(BridgeError, match="the valid split is empty"):
        check_records(read_records(d), None)


def test_chat_without_assistant_and_bad_role(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    p = write_records(tmp_path / "c.jsonl", recs)
    with pytest.raises(BridgeError) as e:
        check_records(read_records(p), None)
    assert "c.jsonl:1: messages has no assistant message" in str(e.value)
    assert "c.jsonl:2: messages[0].role 'robot'" in str(e.value)


def test_truncation_warns_once_with_a_count(tok, capsys):
    recs = [{"text": " ".join(["one"] * n)} for n in (3, 30, 40, 5)]
    exs, stats = tokenize_split(recs, [f"r{i}" for i in range(4)], "text", "text", tok, False, 16)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "2 of 4 examples are longer than max_seq_len=16" in err
    assert stats["truncated"] == 2 and max(len(e.tokens) for e in exs) == 16


def test_examples_longer_than_the_model_context_are_counted_and_truncated_to_it(tok, capsys):
    recs = [{"text": " ".join(["one"] * n)} for n in (3, 30, 40, 5, 12)]
    exs, stats = tokenize_split(recs, [f"r{i}" for i in range(5)], "text", "text", tok, False, 2048, "train",
                                context=20)
    err = capsys.readouterr().err
    assert err.count("warning") == 1, err
    assert ("train: 2 of 5 examples are longer than the model's context of 20 tokens (max_position_embeddings) "
            "(longest 41): they are truncated to 20 tokens") in err
    assert stats["truncated"] == 2 and stats["longest"] == 41 and max(len(e.tokens) for e in exs) == 20
    tokenize_split(recs, [f"r{i}" for i in range(5)], "text", "text", tok, False, 2048, "train", context=64)
    assert capsys.readouterr().err == ""  # everything fits: no warning


# ------------------------------------------------------------------ ShareGPT
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(chat_records: list[dict]) -> list[dict]:
    return [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in r["messages"]]}
            for r in chat_records]


def test_sharegpt_records_train_exactly_like_chat_records(tok, tmp_path):
    """`conversations` with from human/gpt/system: detected, and tokenized with the same tokens and the
    same loss mask (every assistant turn, nothing else) as the equivalent `messages` records."""
    chat = task_records("chat", 12)
    chat[0]["messages"] += [{"role": "user", "content": "again"}, {"role": "assistant", "content": "one two"}]
    p = write_records(tmp_path / "sg.jsonl", as_sharegpt(chat))
    sg = prepare(str(p), tok, TrainConfig(valid_fraction=0.25))
    ref = prepare(chat, tok, TrainConfig(valid_fraction=0.25))
    assert sg.info["format"] == "sharegpt" and sg.info["template"] == "chat_template" and sg.info["mask_prompt"]
    for split in ("train", "valid"):
        assert len(sg.examples[split]) == len(ref.examples[split]) > 0
        for a, b in zip(sg.examples[split], ref.examples[split]):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.mask, b.mask)
    two_turns = next(e for e in sg.examples["train"] + sg.examples["valid"] if len(e.tokens) > 20)
    assert targets_text(tok, two_turns).count("<|end|>") == 2  # both gpt turns, with their end-of-turn


def test_sharegpt_bad_turns_are_listed(tmp_path):
    recs = [{"conversations": [{"from": "human", "value": "hi"}]},
            {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": 3}]}]
    with pytest.raises(BridgeError) as e:
        check_records(read_records(write_records(tmp_path / "s.jsonl", recs)), None)
    msg = str(e.value)
    assert "s.jsonl:1: conversations has no gpt/assistant turn" in msg
    assert "s.jsonl:2: conversations[0].from 'robot'" in msg and "s.jsonl:2: conversations[1].value" in msg


def test_response_cut_off_by_truncation_is_dropped(tok, capsys):
    recs = [{"prompt": " ".join(["one"] * 30), "completion": "two"}, {"prompt": "one", "completion": "two"}]
    exs, stats = tokenize_split(recs, ["a", "b"], "completions", "chat_template", tok, True, 16)
    assert len(exs) == 1 and stats["dropped"] == 1
    assert "1 had no response tokens left and were dropped" in capsys.readouterr().err


def test_hub_name_without_datasets_or_offline_is_one_line():
    with pytest.raises(BridgeError, match=r"dataset 'alpaca_cleaned': .*'yahma/alpaca-cleaned'") as e:
        read_records("alpaca_cleaned")
    assert "\n" not in str(e.value)
    with pytest.raises(BridgeError, match="no such file or directory"):
        read_records("./missing/train.jsonl")


def test_mask_prompt_on_text_is_refused(tok):
    with pytest.raises(BridgeError, match="text format has no prompt"):
        prepare(task_records("text", 4), tok, TrainConfig(mask_prompt=True))


# ------------------------------------------------------------------ settings
def test_alpha_and_scale_conversions():
    c = make_config(lora_rank=8, lora_alpha=16)
    assert (c.scale, c.alpha, c.alpha_given_as) == (2.0, 16.0, "lora_alpha")
    c = make_config(lora_rank=4, lora_scale=10.0)
    assert (c.scale, c.alpha, c.alpha_given_as) == (10.0, 40.0, "scale")
    assert make_config().scale == 20.0  # mlx-lm's default
    with pytest.raises(BridgeError, match="give one of them, not both"):
        make_config(lora_alpha=16, lora_scale=2.0)


def test_settings_errors_are_listed_together():
    with pytest.raises(BridgeError) as e:
        make_config(batch_size=0, lr_schedule="exp", fine_tune_type="qlora", bogus=1)
    assert "bogus: unknown setting" in str(e.value)
    with pytest.raises(BridgeError) as e:
        make_config(batch_size=0, lr_schedule="exp", fine_tune_type="qlora")
    assert "3 problems" in str(e.value)


def test_cli_beats_yaml_beats_defaults(tmp_path):
    from mlx_bridge.train import cli

    y = tmp_path / "train.yaml"
    y.write_text("model: m\ndata: d\nlora_rank: 4\nlearning-rate: 3e-4\nlora_alpha: 8\nepochs: 2\n"
                 "lora_parameters:\n  dropout: 0.05\n")
    p = argparse.ArgumentParser()
    cli.build_parser(p)
    args = p.parse_args(["--config", str(y), "--lora-rank", "16", "--lora-scale", "1.5", "--iters", "7"])
    s = cli.settings_from(args)
    assert s["lora_rank"] == 16 and s["lora_scale"] == 1.5 and "lora_alpha" not in s
    assert s["iters"] == 7 and "epochs" not in s
    assert s["lora_dropout"] == 0.05 and s["model"] == "m"
    cfg = make_config(**{k: v for k, v in s.items() if k not in ("model", "data")})
    assert cfg.learning_rate == 3e-4  # YAML 1.1 reads "3e-4" as a string: coerced
    assert cfg.batch_size == 4  # default
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 4\n  oops: [\n")
    with pytest.raises(BridgeError, match=r"bad.yaml:\d+: not valid YAML"):
        load_yaml(bad)
    bad.write_text(json.dumps({"lora_rnak": 4}))
    with pytest.raises(BridgeError, match="lora_rnak: unknown setting"):
        load_yaml(bad)


def test_loss_plot_smooths_the_train_curve_and_marks_validation(tmp_path):
    from mlx_bridge.train.log import TrainLog, smooth, smoothing_window

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothing_window(10) == 1 and smoothing_window(200) == 10 and smoothing_window(10_000) == 50
    log = TrainLog([{"step": i, "loss": 3.0 / i} for i in range(1, 101)] + [{"step": 0, "val_loss": 3.1, "val_ppl": 22.0}])
    log.plot(tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
