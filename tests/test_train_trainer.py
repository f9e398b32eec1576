"""MLXTrainer on tiny MLX models: learning, LoRA/DoRA/full/QLoRA, checkpoint contents, probes, resume, CLI."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_bridge.cli import main as cli_main
from mlx_bridge.errors import BridgeError
from mlx_bridge.hashing import hash_file
from mlx_bridge.manifest import Manifest
from mlx_bridge.probes import Probes
from mlx_bridge.testing import mlx_convert, tiny_hf_model
from mlx_bridge.testing.train import task_records, write_records, write_split_dir
from mlx_bridge.train.trainer import MLXTrainer

FAST = dict(quiet=True, learning_rate=1e-2, batch_size=4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    hf = tiny_hf_model(root / "hf", "llama", seed=1)
    return {"f32": mlx_convert(hf, root / "mlx"), "q4": mlx_convert(hf, root / "q4", quantize=True, bits=4,
                                                                    group_size=32), "hf": hf}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {f: write_split_dir(root / f, f, n_train=24, n_valid=8) for f in ("completions", "chat", "alpaca", "text")}


@pytest.fixture(scope="module")
def data(datasets):
    return datasets["completions"]


def reload_logits(base, ckpt, ids):
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(ckpt))
    return np.array(model(mx.array(ids)).astype(mx.float32))


def test_lora_learns_and_writes_a_complete_checkpoint(bases, data, tmp_path):
    out = tmp_path / "ckpt"
    tr = MLXTrainer(str(bases["f32"]), str(data), out=out, lora_rank=4, lora_alpha=8, targets=["q_proj", "v_proj"],
                    eval_every=10, **FAST)
    before = tr.evaluate()["loss"]
    summary = tr.train(epochs=5)
    after = tr.evaluate()["loss"]
    assert after < 0.7 * before, (before, after)
    assert summary["steps"] == 30 and summary["completed"]

    names = {p.name for p in out.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "manifest.json", "probes.safetensors",
            "training_log.jsonl", "loss.png", "optimizer.safetensors", "trainer_state.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                      "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    w = mx.load(str(out / "adapters.safetensors"))
    assert set(w) == {f"model.layers.{i}.self_attn.{p}.{ab}" for i in (0, 1) for p in ("q_proj", "v_proj")
                      for ab in ("lora_a", "lora_b")}
    assert w["model.layers.0.self_attn.v_proj.lora_a"].shape == (64, 4)
    assert w["model.layers.0.self_attn.v_proj.lora_b"].shape == (4, 32)

    m = Manifest.load(out)
    assert m.kind == "checkpoint"
    assert m.adapter == {"type": "lora", "rank": 4, "scale": 2.0, "lora_alpha": 8.0, "alpha_given_as": "lora_alpha",
                         "dropout": 0.0, "targets": ["self_attn.q_proj", "self_attn.v_proj"], "layers": [0, 1],
                         "num_layers": -1}
    assert m.base_model["config"] == json.loads((bases["f32"] / "config.json").read_text())
    assert m.base_model["weight_hashes"] == {"model.safetensors": hash_file(bases["f32"] / "model.safetensors")}
    assert m.base_model["path"] == str(bases["f32"].resolve()) and m.base_model["quantization"] is None
    assert m.architecture["model_type"] == "llama"
    assert m.hyperparameters["seed"] == 0 and m.hyperparameters["learning_rate"] == 1e-2
    assert m.hyperparameters["lora_alpha"] == 8 and m.hyperparameters["total_steps"] == 30
    assert m.dataset["format"] == "completions" and m.dataset["template"] == "chat_template"
    assert m.dataset["counts"] == {"train": 24, "valid": 8, "test": 0} and len(m.dataset["sha256"]) == 64
    assert m.environment["mlx_lm"] and m.environment["mlx"]
    assert m.training["steps"] == 30 and m.training["final_valid_loss"] == pytest.approx(after)
    assert m.files == {n: hash_file(out / n) for n in names if n != "manifest.json"}

    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in log if "val_loss" in r] == [0, 10, 20, 30]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # probes: what mlx-lm computes when it loads the checkpoint itself
    p = Probes.load(out)
    assert p.input_ids.shape[0] == 4 and p.greedy.shape == (4, 8)
    np.testing.assert_allclose(reload_logits(bases["f32"], out, p.input_ids), p.logits, atol=1e-5)
    assert p.prompts and m.probes["num"] == 4


@pytest.mark.parametrize("kind,base,fmt", [("dora", "f32", "chat"), ("full", "f32", "text"), ("lora", "q4", "alpaca"),
                                           ("dora", "q4", "completions")])
def test_fine_tune_types_reload_in_mlx_lm(bases, datasets, tmp_path, kind, base, fmt):
    tr = MLXTrainer(str(bases[base]), str(datasets[fmt]), fine_tune_type=kind, lora_rank=4, num_layers=1, **FAST)
    assert tr.data.info["format"] == fmt
    before = tr.evaluate()["loss"]
    tr.train(iters=4)
    assert tr.evaluate()["loss"] < before
    out = tr.save_checkpoint(tmp_path / kind)
    w = mx.load(str(out / "adapters.safetensors"))
    assert all(k.startswith("model.layers.1.") for k in w)  # only the last block
    if kind == "full":
        assert "model.layers.1.input_layernorm.weight" in w and w["model.layers.1.mlp.up_proj.weight"].shape == (128, 64)
        assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"] is None
    else:
        assert all(v.dtype == mx.float32 for v in w.values())
        assert ("model.layers.1.self_attn.q_proj.m" in w) == (kind == "dora")
    m = Manifest.load(out)
    assert m.adapter["type"] == kind and m.adapter["layers"] == [1]
    assert (m.base_model["quantization"] is not None) == (base == "q4")
    p = Probes.load(out)
    np.testing.assert_allclose(reload_logits(bases[base], out, p.input_ids), p.logits, atol=1e-4)


def test_resume_continues_exactly(bases, data, tmp_path):
    """Kill after step 5 (last checkpoint at 4), resume: losses equal the uninterrupted run's."""
    settings = dict(lora_rank=4, lora_dropout=0.1, grad_accum=2, batch_size=3, lr_schedule="cosine", warmup=2,
                    learning_rate=5e-3, save_every=2, quiet=True, seed=7)

    a = MLXTrainer(str(bases["f32"]), str(data), out=tmp_path / "a", **settings)
    a.train(iters=8)
    full = [r["loss"] for r in a.log.steps()]

    def interrupt(trainer, record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    b = MLXTrainer(str(bases["f32"]), str(data), out=tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        b.train(iters=8, callbacks=[interrupt])
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 4
    c = MLXTrainer(str(bases["f32"]), str(data), out=tmp_path / "b", resume=True, **settings)
    assert c.step == 4
    c.train(iters=8)
    resumed = [r["loss"] for r in c.log.steps()]
    assert len(resumed) == 8
    np.testing.assert_array_equal(resumed, full)
    wa, wc = mx.load(str(tmp_path / "a" / "adapters.safetensors")), mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wc[k])) for k in wa)
    with pytest.raises(BridgeError, match="cannot resume with different settings: batch_size"):
        MLXTrainer(str(bases["f32"]), str(data), out=tmp_path / "b", resume=True, **dict(settings, batch_size=4))


def test_gradient_accumulation_equals_one_big_batch(bases, data):
    """2 micro-batches of 2 give the same update as one batch of 4 (token-weighted, exact mask)."""
    from mlx_bridge.train.batching import collate
    from mlx_bridge.train.step import Stepper

    results = []
    for split in ([0, 1, 2, 3],), ([0, 1], [2, 3]):
        tr = MLXTrainer(str(bases["f32"]), str(data), lora_rank=4, **FAST)
        tr._ensure_optimizer(10)
        st = Stepper(tr.model, tr.optimizer, compile=True)
        ex = tr.data.examples["train"]
        for i, idx in enumerate(split):
            b = collate(ex, idx, pad_multiple=1)
            st.micro(mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask), last=i == len(split) - 1)
        results.append({k: np.array(v) for k, v in tree_flatten(tr.model.trainable_parameters())})
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=1e-6)


def test_grad_checkpoint_same_losses_and_restores_the_class(bases, data):
    losses = []
    for gc in (False, True):
        tr = MLXTrainer(str(bases["f32"]), str(data), lora_rank=4, grad_checkpoint=gc, **FAST)
        tr.train(iters=3)
        losses.append([r["loss"] for r in tr.log.steps()])
        call = type(tr.model.layers[0]).__call__
        assert call.__name__ == "__call__"  # the checkpointing wrapper is gone after training
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_seed_snippet_with_local_model_and_alpaca_json(bases, tmp_path, monkeypatch):
    from mlx_bridge import MLXTrainer as Public

    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "alpaca.json", task_records("alpaca", 16))
    trainer = Public(model=str(bases["f32"]), dataset="alpaca.json", lora_rank=16)
    summary = trainer.train(epochs=3)
    trainer.save_checkpoint("./checkpoints/alpaca-lora")
    metrics = trainer.evaluate()
    assert summary["epochs"] == 3.0 and summary["steps"] == 12  # 14 train records (2 held out), batch 4
    assert set(metrics) >= {"loss", "perplexity"} and metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))
    m = Manifest.load(tmp_path / "checkpoints" / "alpaca-lora")
    assert m.adapter["rank"] == 16 and m.adapter["scale"] == 20.0 and m.adapter["lora_alpha"] == 320.0
    assert m.dataset["format"] == "alpaca"
    with pytest.raises(BridgeError, match="exists and is not empty"):
        trainer.save_checkpoint(tmp_path / "checkpoints")


def test_cli_train_with_yaml_and_overrides(bases, data, tmp_path, capsys):
    y = tmp_path / "train.yaml"
    y.write_text(f"model: {bases['f32']}\ndata: {data}\nlora_rank: 2\nlora_alpha: 4\nbatch_size: 8\n"
                 "learning_rate: 1e-3\niters: 50\nquiet: true\n")
    out = tmp_path / "out"
    rc = cli_main(["train", "--config", str(y), "--out", str(out), "--lora-scale", "3", "--iters", "2",
                   "--targets", "q_proj,o_proj", "--num-layers", "1", "--lr-schedule", "cosine", "--warmup", "1"])
    assert rc == 0
    m = Manifest.load(out)
    assert m.adapter["rank"] == 2 and m.adapter["scale"] == 3.0 and m.adapter["alpha_given_as"] == "scale"
    assert m.adapter["targets"] == ["self_attn.o_proj", "self_attn.q_proj"] and m.adapter["layers"] == [1]
    assert m.hyperparameters["batch_size"] == 8 and m.hyperparameters["lr_schedule"] == "cosine"
    assert m.training["steps"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    # the same command again: refused; with --resume: nothing left to do; with --force: trained anew
    assert cli_main(["train", "--config", str(y), "--out", str(out), "--iters", "2"]) == 2
    assert "exists and is not empty (use --resume to continue its run or --force" in capsys.readouterr().err
    base = ["train", "--config", str(y), "--out", str(out), "--lora-scale", "3", "--targets", "q_proj,o_proj",
            "--num-layers", "1", "--lr-schedule", "cosine", "--warmup", "1"]
    assert cli_main(base + ["--iters", "2", "--resume"]) == 0
    assert Manifest.load(out).files == m.files  # complete already: nothing rewritten
    assert cli_main(base + ["--iters", "3", "--force"]) == 0
    assert Manifest.load(out).training["steps"] == 3


def test_a_failed_save_leaves_the_previous_checkpoint(bases, data, tmp_path, monkeypatch):
    import mlx_bridge.train.trainer as trainer_mod

    out = tmp_path / "ck"
    tr = MLXTrainer(str(bases["f32"]), str(data), out=out, lora_rank=2, save_every=2, **FAST)
    real = trainer_mod.compute_probes
    calls = []

    def failing(*a, **k):  # the second save dies half-way (after the adapters were written)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-save")
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "compute_probes", failing)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        tr.train(iters=6)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    m = Manifest.load(out)
    assert m.files == {n: hash_file(out / n) for n in m.files}  # intact, consistent
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no half-written directory left


@pytest.mark.parametrize("extra,message", [
    (["--lora-rank", "40"], "lora_rank 40 is larger than layers.0.self_attn.k_proj (64 -> 32)"),
    (["--targets", "q_proj,wq"], "targets: 'wq' matches no linear layer"),
    (["--num-layers", "5"], "num_layers: 5 is more than the model's 2 blocks"),
    (["--batch-size", "0", "--warmup", "-1"], "training settings: 2 problems: batch_size"),
    (["--keep-last", "2"], "keep_last: 2 numbered checkpoints need save_every"),
])
def test_cli_bad_settings_exit_2(bases, data, tmp_path, capsys, extra, message):
    rc = cli_main(["train", "--model", str(bases["f32"]), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--quiet"] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_alpha_and_scale_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--lora-alpha", "4", "--lora-scale", "2"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_bad_model_and_data_exit_2(bases, data, tmp_path, capsys):
    weird = tmp_path / "weird"
    shutil.copytree(bases["f32"], weird)
    cfg = json.loads((weird / "config.json").read_text())
    (weird / "config.json").write_text(json.dumps(dict(cfg, model_type="no_such_arch")))
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    cases = [
        (["--model", str(weird), "--data", str(data)], "model_type 'no_such_arch' is not an architecture mlx-lm"),
        (["--model", str(bases["q4"]), "--data", str(data), "--fine-tune-type", "full"],
         "full fine-tuning needs a non-quantized base"),
        (["--model", str(bases["f32"]), "--data", str(bad_data)], "bad.jsonl:2: not valid JSON"),
        (["--model", "no-such-org/no-such-model", "--data", str(data)], "could not be fetched from the Hugging Face hub"),
    ]
    for args, message in cases:
        rc = cli_main(["train", "--out", str(tmp_path / "o"), "--quiet"] + args)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_numbered_checkpoints_keep_last_and_the_latest_in_out(bases, data, tmp_path, capsys):
    """--save-every 2 --keep-last 2 over 7 steps: step-4, step-6 and step-7 written, the last 2 kept; OUT
    equals the newest (same files); each numbered one is a complete checkpoint; probes once per save."""
    import mlx_bridge.train.trainer as trainer_mod

    out = tmp_path / "ck"
    calls = []
    real = trainer_mod.compute_probes
    trainer_mod.compute_probes = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        tr = MLXTrainer(str(bases["f32"]), str(data), out=out, lora_rank=2, save_every=2, keep_last=2,
                        **dict(FAST, quiet=False))
        tr.train(iters=7)
    finally:
        trainer_mod.compute_probes = real
    assert len(calls) == 4  # steps 2, 4, 6, 7: one probe run per save, none for OUT itself
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000006", "step-0000007"]
    latest = out / "checkpoints" / "step-0000007"
    for name in Manifest.load(latest).files:
        assert (out / name).read_bytes() == (latest / name).read_bytes(), name
    assert Manifest.load(out).files == Manifest.load(latest).files
    assert json.loads((out / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())["step"] == 6
    assert mx.load(str(out / "checkpoints" / "step-0000006" / "adapters.safetensors"))
    err = capsys.readouterr().err
    assert f"checkpoint: {out} (step 7/7" in err
    assert "numbered checkpoints: 2 in" in err and "step-0000006 .. step-0000007" in err
    assert f"next: mlx-bridge export {out} --out {tmp_path / 'ck-export'}" in err
    # resuming keeps the numbered ones and adds to them
    c = MLXTrainer(str(bases["f32"]), str(data), out=out, resume=True, lora_rank=2, save_every=2, keep_last=2, **FAST)
    c.train(iters=7)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_validation_at_step_0_and_at_the_end_by_default(bases, data):
    from mlx_lm.lora import CONFIG_DEFAULTS

    from mlx_bridge.train.config import TrainConfig

    # the defaults are mlx-lm's (steps_per_eval, val_batches)
    assert (TrainConfig.eval_every, TrainConfig.val_batches) == (CONFIG_DEFAULTS["steps_per_eval"],
                                                                  CONFIG_DEFAULTS["val_batches"])
    tr = MLXTrainer(str(bases["f32"]), str(data), lora_rank=2, **FAST)
    tr.train(iters=3)
    assert [r["step"] for r in tr.log.records if "val_loss" in r] == [0, 3]


def test_data_is_checked_before_the_model_loads(bases, tmp_path, monkeypatch):
    import mlx_bridge.train.trainer as trainer_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(trainer_mod, "load_base", no_load)
    with pytest.raises(BridgeError, match="no such file or directory"):
        MLXTrainer(str(bases["f32"]), str(tmp_path / "typo.jsonl"), lora_rank=2, **FAST)
    bad = write_records(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(BridgeError, match="bad.jsonl:2: missing field 'completion'"):
        MLXTrainer(str(bases["f32"]), str(bad), lora_rank=2, **FAST)


def test_examples_beyond_the_model_context_are_truncated_to_it(bases, tmp_path, capsys):
    long = {"text": " ".join(["one two"] * 200)}  # 400 words > the tiny model's 256 positions
    recs = task_records("text", 7) + [long]
    tr = MLXTrainer(str(bases["f32"]), {"train": recs, "valid": recs[:2]}, lora_rank=2, mask_prompt=False, **FAST)
    assert tr.context == 256
    assert max(len(e.tokens) for e in tr.data.examples["train"]) == 256
    assert "train: 1 of 8 examples are longer than the model's context of 256 tokens" in capsys.readouterr().err
