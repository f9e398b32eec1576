"""`MLXTrainer`: LoRA, QLoRA, DoRA and full fine-tuning of an mlx-lm model, with a portable checkpoint.

Example:
    >>> from mlx_bridge import MLXTrainer
    >>> trainer = MLXTrainer(model="path/to/mlx-model", dataset="data/alpaca.json", lora_rank=16)  # doctest: +SKIP
    >>> trainer.train(epochs=3)  # doctest: +SKIP
    >>> trainer.save_checkpoint("./checkpoints/alpaca-lora")  # doctest: +SKIP
    >>> trainer.evaluate()  # doctest: +SKIP
    {'loss': 1.83, 'perplexity': 6.2, 'tokens': 5120}
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import BridgeError
from ..fsutil import check_apart, recover
from ..hashing import algorithm_of
from ..manifest import Manifest, environment
from . import checkpoint as ck, numbered
from .backend import backend_info, describe, probe_dtype, refuse_missing_kernels
from .batching import BatchStream, eval_batches
from .config import TrainConfig, make_config
from .dataset import TokenizedData, check_data, prepare
from .golden import MAX_NEW_TOKENS, compute_probes, probe_ids
from .log import Progress, TrainLog, phase, speed
from .model import apply_fine_tune, grad_checkpointing, is_quantized, load_base, model_dtype
from .step import Stepper, loss_sum, make_optimizer

DEFAULT_PROBE_TEXTS = ["Give three tips for staying healthy.", "What is two plus two?",
                       "Write a list of five words.", "Hello, how are you today?"]


def _micro_seed(seed: int, position: int) -> int:
    """The RNG seed of micro-batch `position` (dropout): a pure function, so resume reproduces it."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class MLXTrainer:
    """Fine-tune `model` (a local MLX/HF directory or a hub id) on `dataset` with mlx-lm's layers.

    Args:
        model: local model directory or hub id (a quantized base means QLoRA).
        dataset: local .json/.jsonl file or directory, hub name (`alpaca_cleaned`), a list of records or
            a dict of splits; may be given later with `load_data`.
        out: checkpoint directory for periodic and final saves during `train()` (optional).
        resume: continue from the checkpoint in `out` (an error when there is none or it is damaged).
        force: replace an existing `out`.
        revision: hub revision (branch, tag or commit) of a hub model; recorded in the manifest.
        **settings: any `TrainConfig` field (fine_tune_type, lora_rank, lora_alpha or lora_scale, targets,
            num_layers, batch_size, learning_rate, grad_accum, lr_schedule, warmup, max_seq_len, seed ...).

    Attributes:
        model, tokenizer: the mlx-lm model (with its LoRA/DoRA layers) and TokenizerWrapper.
        config: the TrainConfig; adapter: the manifest's adapter section; log: the TrainLog.

    Raises:
        BridgeError: bad settings, model, data or output directory (one line naming the cause).
    """

    def __init__(self, model: str, dataset=None, *, out: str | os.PathLike | None = None, resume: bool = False,
                 force: bool = False, revision: str | None = None, **settings):
        self.config: TrainConfig = make_config(**settings)
        self.out = Path(out) if out is not None else None
        self._resume_dir = None
        if self.out is not None:
            if resume:
                recover(self.out, lambda m: print(f"note: {m}", file=sys.stderr))  # a save stopped between its renames: put the checkpoint back
                if not ck.has_checkpoint(self.out):
                    raise BridgeError(f"{self.out}: --resume given but there is no checkpoint to resume there")
                self._resume_dir = self.out
            elif not resume and not force and self.out.exists():
                if not self.out.is_dir() or any(self.out.iterdir()):
                    raise BridgeError(f"{self.out}: output directory exists and is not empty (use --resume to "
                                      "continue its run or --force to replace it)")
        checked = check_data(dataset, self.config) if dataset is not None else None  # before the model loads
        self._say(f"loading {model} ...")
        self._base = load_base(str(model), revision)
        if self.out is not None:
            check_apart(self.out, self._base.path, "the base model")
        self.model, self.tokenizer = self._base.model, self._base.tokenizer
        self.adapter = apply_fine_tune(self.model, self.config)
        self.data: TokenizedData | None = None
        self.log = TrainLog()
        self.step = 0  # optimizer steps done
        self.position = 0  # micro-batches consumed
        self.tokens = self.input_tokens = 0
        self.seconds = 0.0
        self.total_steps: int | None = None
        self.optimizer = None
        self._owned: set[Path] = set()
        self.backend = backend_info()  # where MLX trains: metal, cuda or cpu, and the device's name
        self._startup = False  # the next step is the first of a train() call (compiles)
        self._say(f"backend {describe(self.backend)}")
        self._say(f"model {model}: {len(self.model.layers)} blocks, "
                  f"{'quantized (QLoRA)' if is_quantized(self.model) else model_dtype(self.model)}; "
                  f"{self.config.fine_tune_type} on {len(self.adapter['layers'])} blocks, "
                  f"{self.trainable_parameters() / 1e6:.3f}M trainable parameters")
        if checked is not None:
            self.load_data(checked)
        if self._resume_dir is not None:
            self._resume(self._resume_dir)

    # ---------------------------------------------------------------- data
    def load_data(self, dataset) -> dict:
        """Read, check and tokenize a dataset; returns the manifest's dataset section."""
        self.data = prepare(dataset, self.tokenizer, self.config, context=self.context)
        c = self.data.info["counts"]
        self._say(f"data {self.data.info['name']}: {self.data.info['format']} format, template "
                  f"{self.data.info['template']}, {c['train']} train / {c['valid']} valid / {c['test']} test")
        return self.data.info

    @property
    def context(self) -> int | None:
        """The model's context length (config.json's max_position_embeddings), when it states one."""
        c = self._base.config
        n = c.get("max_position_embeddings") or c.get("text_config", {}).get("max_position_embeddings")
        return int(n) if n else None

    def _examples(self, split: str):
        if self.data is None:
            raise BridgeError("dataset: none given (pass dataset= or call load_data)")
        if split not in self.data.examples:
            raise BridgeError(f"dataset: has no {split} split")
        return self.data.examples[split]

    def trainable_parameters(self) -> int:
        return sum(v.size for v in ck.trainable_weights(self.model).values())

    # ---------------------------------------------------------------- length of the run
    def _plan(self, epochs: float | None, iters: int | None) -> tuple[int, int]:
        """(total optimizer steps, total micro-batches) for the run."""
        cfg = self.config
        per_epoch = -(-len(self._examples("train")) // cfg.batch_size)
        if epochs is not None and iters is not None:
            raise BridgeError("train: give epochs or iters, not both")
        if epochs is None and iters is None:
            epochs, iters = cfg.epochs, cfg.iters
            if epochs is None and iters is None:
                epochs = 1.0
        if iters is not None:
            return int(iters), int(iters) * cfg.grad_accum
        micro = max(1, math.ceil(float(epochs) * per_epoch))
        return -(-micro // cfg.grad_accum), micro

    def _ensure_optimizer(self, total_steps: int) -> None:
        if self.optimizer is not None and self.total_steps == total_steps:
            return
        old = self.optimizer
        if old is not None and self.config.lr_schedule != "constant":
            raise BridgeError(f"train: the {self.config.lr_schedule} schedule was built for {self.total_steps} "
                              f"steps; a run of {total_steps} steps needs a new trainer")
        self.optimizer = make_optimizer(self.config, total_steps)
        if old is not None:
            self.optimizer.state = old.state
        self.total_steps = total_steps

    # ---------------------------------------------------------------- training
    def train(self, epochs: float | None = None, iters: int | None = None,
              callbacks: list[Callable[["MLXTrainer", dict], None]] = ()) -> dict:
        """Train until `epochs` passes over the train split or `iters` optimizer steps (from the config when
        not given; one epoch by default). Resumed trainers continue where the checkpoint stopped.

        With `out` set, checkpoints are written every `save_every` steps and at the end. Each callback is
        called as `cb(trainer, record)` after every step; an exception from it stops the run.

        Returns the training summary (also the manifest's `training` section).
        """
        cfg = self.config
        total, total_micro = self._plan(epochs, iters)
        self._ensure_optimizer(total)
        stream = BatchStream(self._examples("train"), cfg.batch_size, cfg.seed)
        stepper = Stepper(self.model, self.optimizer, cfg.compile)
        has_valid = "valid" in self.data.examples
        self.model.train()
        bar = Progress(total, initial=min(self.step, total), quiet=cfg.quiet)
        self._startup = True
        try:
            with grad_checkpointing(self.model, cfg.grad_checkpoint), refuse_missing_kernels():
                if has_valid and cfg.eval_every and self.step == 0:
                    self._validate(bar)
                while self.step < total and self.position < total_micro:
                    record = self._one_step(stream, stepper, total_micro)
                    bar.step(record)
                    for cb in callbacks:
                        cb(self, record)
                    last = self.step == total or self.position == total_micro
                    if has_valid and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                        self._validate(bar)
                    if self.out is not None and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                        self._save_during_training()
        finally:
            bar.close()
        self.model.eval()
        summary = self.summary()
        if self.out is not None:
            self._say(self._end_line(summary))
        return summary

    def _save_during_training(self) -> None:
        """With save_every: a numbered checkpoint, then OUT made the same (hard links); else OUT only."""
        if not self.config.save_every:
            self.save_checkpoint(self.out, force=True)
            return
        d = self.save_checkpoint(numbered.numbered_dir(self.out, self.step), force=True)
        files = {p.name: p for p in d.iterdir() if p.is_file() and p.name != "manifest.json"}
        writers = {n: (lambda dst, src=src: numbered.link_or_copy(src, dst)) for n, src in files.items()}
        ck.write_checkpoint(self.out, Manifest.load(d), writers, force=True, carry=(numbered.SUBDIR,))
        self._owned.add(self.out.resolve())
        numbered.prune(self.out, self.config.keep_last)

    def _end_line(self, summary: dict) -> str:
        """Where the checkpoint is and what to run next."""
        valid = summary.get("final_valid_loss")
        kept = numbered.numbered(self.out)
        lines = [f"checkpoint: {self.out} (step {summary['steps']}/{summary['total_steps']}, train loss "
                 f"{summary['final_train_loss']:.4f}" + (f", valid loss {valid:.4f}" if valid is not None else "")
                 + (", complete)" if summary["completed"] else ", not complete: --resume continues it)")]
        if kept:
            names = kept[0][1].name + (f" .. {kept[-1][1].name}" if len(kept) > 1 else "")
            lines.append(f"numbered checkpoints: {len(kept)} in {self.out / numbered.SUBDIR} ({names}; "
                         f"{self.out} is the latest)")
        lines.append(f"loss curve: {self.out / ck.PLOT}")
        lines.append(f"next: mlx-bridge export {self.out} --out {self.out.parent / (self.out.name + '-export')}")
        return "\n".join(lines)

    def _one_step(self, stream: BatchStream, stepper: Stepper, total_micro: int) -> dict:
        cfg = self.config
        tic = time.perf_counter()
        ls_sum, n_sum, real = 0.0, 0, 0
        traces = stepper.traces
        for j in range(cfg.grad_accum):
            b = stream.batch(self.position)
            last = j == cfg.grad_accum - 1 or self.position + 1 == total_micro
            mx.random.seed(_micro_seed(cfg.seed, self.position))
            ls, n = stepper.micro(mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask), last)
            ls_sum += ls.item()
            n_sum += b.ntoks
            real += b.real_tokens
            self.position += 1
            if last:
                break
        dt = time.perf_counter() - tic
        self.step += 1
        self.seconds += dt
        self.tokens += n_sum
        self.input_tokens += real
        record = {"step": self.step, "loss": ls_sum / n_sum, "tokens": n_sum, "input_tokens": real,
                  "lr": float(self.optimizer.learning_rate.item()), "tokens_per_sec": real / dt,
                  "peak_memory_gb": mx.get_peak_memory() / 1e9, "epoch": self.position / stream.per_epoch,
                  "seconds": dt}
        if self._startup or stepper.traces > traces:  # the first step of a train() call (kernel builds) or
            # one that traced and compiled the step (the second, once the optimizer's state exists; new shapes)
            record.update(startup=True, backend=self.backend["backend"], device=self.backend["device"])
            self._startup = False
        self.log.add(record)
        return record

    def _validate(self, bar: Progress | None = None) -> dict:
        m = self.evaluate("valid", limit=self.config.val_batches, progress=not self.config.quiet)
        self.log.add({"step": self.step, "val_loss": m["loss"], "val_ppl": m["perplexity"]})
        if bar is not None:
            bar.write(f"step {self.step}: valid loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}")
        return m

    def evaluate(self, split: str = "valid", limit: int = -1, progress: bool = False) -> dict:
        """Mean loss over the split's response tokens (exact mask) and its perplexity.

        Returns {"loss", "perplexity", "tokens"}; `limit` caps the number of batches (-1 = all);
        `progress` shows a bar when it takes more than a couple of seconds.
        """
        examples = self._examples(split)
        was_training = self.model.training
        self.model.eval()
        total, n = mx.array(0.0), 0
        n_batches = -(-len(examples) // self.config.batch_size)
        n_batches = n_batches if limit < 0 else min(limit, n_batches)
        for b in phase(eval_batches(examples, self.config.batch_size, limit=limit), f"{split} loss", n_batches,
                       quiet=not progress):
            ls, _ = loss_sum(self.model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
            total = total + ls
            n += b.ntoks
            mx.eval(total)
        self.model.train(was_training)
        loss = total.item() / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n}

    def summary(self) -> dict:
        every = self.log.steps()
        steps = every[-self.config.steps_per_report:]
        tok = sum(r["tokens"] for r in steps)
        return {
            "steps": self.step, "total_steps": self.total_steps, "micro_batches": self.position,
            "epochs": self.position / max(1, -(-len(self._examples("train")) // self.config.batch_size)),
            "tokens": self.tokens, "input_tokens": self.input_tokens,
            "final_train_loss": sum(r["loss"] * r["tokens"] for r in steps) / tok if tok else None,
            "final_valid_loss": self.log.last("val_loss"), "final_valid_ppl": self.log.last("val_ppl"),
            "seconds": round(self.seconds, 3),
            "tokens_per_sec": self.input_tokens / self.seconds if self.seconds else None,
            **speed(every),
            "trained_on": sorted({f"{r['backend']} ({r['device']})" for r in every if r.get("backend")}),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "completed": self.total_steps is not None and self.step >= self.total_steps,
        }

    # ---------------------------------------------------------------- checkpoints
    def _probe_ids(self) -> np.ndarray:
        if self.data is not None:
            return probe_ids(self.data.examples.get("valid") or self.data.examples["train"])
        from .templates import Example

        toks = [np.asarray(self.tokenizer.encode(t), np.int32) for t in DEFAULT_PROBE_TEXTS]
        return probe_ids([Example(t, np.ones(len(t), bool)) for t in toks])

    def manifest(self) -> Manifest:
        """The checkpoint manifest for the current state (files are added when it is written)."""
        base, cfg = self._base, self.config
        ids = self._probe_ids()
        hyper = dict(cfg.to_dict(), total_steps=self.total_steps)
        if self.data is not None:
            hyper.update(mask_prompt_effective=self.data.info["mask_prompt"],
                         template_effective=self.data.info["template"])
        return Manifest(
            kind="checkpoint",
            base_model={"path": str(base.path), "hub_id": base.hub_id, "revision": base.revision,
                        "config": base.config, "quantization": base.config.get("quantization"),
                        "weight_hashes": base.weight_hashes()},
            architecture={"model_type": base.config["model_type"], "layout": "mlx-lm",
                          "num_layers": len(self.model.layers)},
            adapter=dict(self.adapter),
            hyperparameters=hyper,
            dataset=dict(self.data.info) if self.data is not None else {},
            environment=environment(**self.backend),
            training=self.summary() if self.data is not None else {"steps": 0},
            probes={"file": "probes.safetensors", "num": int(ids.shape[0]), "length": int(ids.shape[1]),
                    "max_new_tokens": MAX_NEW_TOKENS, "dtype": probe_dtype(model_dtype(self.model))},
        )

    def save_checkpoint(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """Write the checkpoint directory (see `mlx_bridge.train.checkpoint`) atomically.

        An existing non-empty directory is refused unless `force` (or this trainer wrote it).
        """
        d = Path(directory)
        force = force or d.resolve() in self._owned
        manifest = self.manifest()
        ids = self._probe_ids()
        base_ref = self._base.hub_id or str(self._base.path)
        data_ref = self.data.info["name"] if self.data is not None else None
        state = {"step": self.step, "position": self.position, "total_steps": self.total_steps,
                 "tokens": self.tokens, "input_tokens": self.input_tokens, "seconds": self.seconds}
        writers = {
            ck.ADAPTERS: lambda p: mx.save_safetensors(str(p), ck.trainable_weights(self.model)),
            ck.ADAPTER_CONFIG: lambda p: _write_json(p, ck.adapter_config(
                self.config, self.adapter, base_ref, data_ref, self.total_steps or 0,
                self.data.info["mask_prompt"] if self.data is not None else None)),
            ck.STATE: lambda p: _write_json(p, state),
            ck.LOG: self.log.write_jsonl,
            ck.PLOT: lambda p: self.log.plot(p, f"{self.config.fine_tune_type} on {Path(base_ref).name}"),
            "probes.safetensors": lambda p: compute_probes(self.model, ids, self.tokenizer,
                                                           probe_dtype(model_dtype(self.model)),
                                                           progress=not self.config.quiet).save(p.parent),
        }
        if self.optimizer is not None:
            writers[ck.OPTIMIZER] = lambda p: ck.save_optimizer(self.optimizer, p)
        out = ck.write_checkpoint(d, manifest, writers, force=force, carry=(numbered.SUBDIR,))
        self._owned.add(out.resolve())
        return out

    def _resume(self, ckpt: Path) -> None:
        manifest, state = ck.read_resume_state(ckpt)
        problems = []
        want = manifest.base_model.get("weight_hashes") or {}
        if want != self._base.weight_hashes(algorithm_of(want, f"{ckpt}/manifest.json: base_model.weight_hashes")):
            problems.append("base model weights differ from the checkpoint's base")
        if self.data is not None and manifest.dataset.get("sha256") != self.data.info["sha256"]:
            problems.append("dataset differs (sha256)")
        old = {k: v for k, v in manifest.hyperparameters.items() if k in TrainConfig.__dataclass_fields__}
        for k, v in self.config.computational().items():
            if k in ("epochs", "iters"):
                continue
            if k in old and old[k] != v:
                problems.append(f"{k}: checkpoint {old[k]!r}, now {v!r}")
        if problems:
            raise BridgeError(f"{ckpt}: cannot resume with different settings: " + "; ".join(problems))
        ck.load_trainable(self.model, ckpt / ck.ADAPTERS)
        self.total_steps = state["total_steps"]
        self.optimizer = make_optimizer(self.config, self.total_steps)
        ck.load_optimizer(self.optimizer, self.model, ckpt / ck.OPTIMIZER)
        self.step, self.position = state["step"], state["position"]
        self.tokens, self.input_tokens, self.seconds = state["tokens"], state["input_tokens"], state["seconds"]
        self.log = TrainLog.read_jsonl(ckpt / ck.LOG)
        self._owned.add(ckpt.resolve())
        self._say(f"resumed from {ckpt} at step {self.step}/{self.total_steps}")

    def _say(self, msg: str) -> None:
        if not self.config.quiet:
            print(msg, file=sys.stderr)


def _write_json(path: Path, obj: dict) -> None:
    import json

    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
