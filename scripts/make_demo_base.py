#!/usr/bin/env python
"""Make the demo's base model: a tiny llama pretrained in PyTorch, written as an MLX directory.

    python scripts/make_demo_base.py [--out mlx_bridge/demo/assets/base] [--steps 4000] [--seed 0]

Steps: build a word-level tokenizer (`tokenizers`) over the demo vocabulary; generate a corpus with
`mlx_bridge.demo.task.corpus` (lists reversed or repeated in plain-text forms, never the demo's chat
format, never a held-out list); pretrain a `LlamaForCausalLM` from scratch on it (AdamW, cosine schedule,
CPU, seeded); save it with transformers, convert it with `mlx_lm.convert` (float32), check it loads with
`mlx_lm.load` and `AutoModelForCausalLM`, and add a `manifest.json` of kind "base" with the recipe.
Rerunning with the same arguments gives the same weights on the same machine (one thread, deterministic
PyTorch CPU kernels; other CPUs may differ in the last bits). About 10 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_bridge.demo import task  # noqa: E402

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Llama-2 style: an assistant turn ends with the end-of-sequence token, the other turns with <|end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} </s> "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CONFIG = dict(  # llama, ~0.6M parameters
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    hidden_act="silu", attention_bias=False, mlp_bias=False,
)


def build_tokenizer(out: Path):
    """Word-level tokenizer: special tokens, the task's words, lower-cased, split on whitespace and punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(task.ITEMS) + list(task.TEXT_WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=SPECIAL[4:],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def encode_corpus(tok, docs: list[str]):
    import torch

    ids = [tok(d).input_ids + [tok.eos_token_id] for d in docs]
    L = max(map(len, ids))
    x = torch.full((len(ids), L), tok.pad_token_id, dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, : len(s)] = torch.tensor(s)
    return x


def pretrain(tok, args) -> "object":
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **CONFIG)
    model = LlamaForCausalLM(cfg)
    data = encode_corpus(tok, task.corpus(args.docs, args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(args.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        batch = data[torch.randint(len(data), (args.batch_size,), generator=g)]
        labels = batch.masked_fill(batch == tok.pad_token_id, -100)
        loss = model(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s",
                  flush=True)
    model.eval()
    return model, loss.item(), time.time() - t0


def corpus_accuracy(model, tok, n: int = 200) -> dict[str, float]:
    """Greedy exact match on held-out lists in the corpus's own forms (what the base can do)."""
    import torch

    rng = random.Random("corpus-eval")
    res = {}
    for op, form in (("reverse", "the reverse of {items} is"), ("repeat", "say {items} :")):
        hits = 0
        for _ in range(n):
            items = task.random_items(rng, heldout=True)
            ids = torch.tensor([tok(form.format(items=" ".join(items))).input_ids])
            want = tok(" ".join(items[::-1] if op == "reverse" else items)).input_ids + [tok.eos_token_id]
            out = model.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id)
            hits += out[0, ids.shape[1]:].tolist() == want
        res[op] = hits / n
    return res


def check_loads(d: Path, tok) -> float:
    """Load `d` with mlx-lm and with transformers; return the max |logit difference| on a corpus prompt."""
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    ids = tok("the reverse of cat sun red fig is fig red sun cat").input_ids
    model, _ = load(str(d))
    ref = np.array(model(mx.array([ids])))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits.numpy()
    diff = float(np.abs(ref - got).max())
    if diff > 1e-3:
        raise SystemExit(f"{d}: mlx-lm and transformers disagree (max |logit diff| {diff})")
    return diff


def model_card(config: dict, recipe: dict) -> str:
    return (
        "---\nlanguage: en\nlibrary_name: mlx\npipeline_tag: text-generation\ntags:\n- mlx\n- mlx-bridge-demo\n---\n"
        "# mlx-bridge demo base model\n\n"
        f"A tiny llama ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocabulary "
        f"{config['vocab_size']} tokens) pretrained from scratch by `scripts/make_demo_base.py` on a generated corpus in "
        "which lists of words are reversed or repeated in plain-text forms (`the reverse of cat sun red is red sun "
        "cat`). It has never seen the chat format that `mlx-bridge demo` fine-tunes it on. Float32, MLX (mlx-lm) "
        "layout, which for llama is also the Hugging Face layout. The recipe is in `manifest.json`.\n\n"
        f"Held-out exact match in the corpus forms: {recipe['heldout_accuracy_corpus_forms']}.\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "mlx_bridge/demo/assets/base"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    work = Path(tempfile.mkdtemp(prefix="demo-base-"))
    tok = build_tokenizer(work / "hf")
    model, final_loss, seconds = pretrain(tok, args)
    acc = corpus_accuracy(model, tok)
    print("held-out accuracy in the corpus forms:", acc)
    model.save_pretrained(str(work / "hf"))
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                     do_sample=False).save_pretrained(str(work / "hf"))

    from mlx_lm import convert

    mlx_dir = work / "mlx"
    convert(str(work / "hf"), str(mlx_dir), dtype="float32")
    max_diff = check_loads(mlx_dir, tok)
    print(f"loads in mlx-lm and transformers; max |logit diff| {max_diff:.2e}")

    import mlx.core as mx

    from mlx_bridge.fsutil import atomic_dir
    from mlx_bridge.hashing import hash_file
    from mlx_bridge.manifest import Manifest, environment

    config = json.loads((mlx_dir / "config.json").read_text())
    manifest = Manifest(
        kind="base",
        base_model={"path": "mlx_bridge/demo/assets/base", "config": config},
        architecture={"model_type": config["model_type"], "layout": "mlx-lm", "num_layers": config["num_hidden_layers"]},
        environment=environment(),
        recipe={"script": "scripts/make_demo_base.py", "argv": sys.argv[1:], "seed": args.seed,
                "framework": f"torch {torch.__version__} (CPU, {args.threads} thread(s), deterministic algorithms)",
                "architecture": "LlamaForCausalLM from scratch", "model": CONFIG,
                "tokenizer": "word-level (tokenizers WordLevel), lower-cased, whitespace/punctuation split",
                "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), linear warmup 5%, cosine decay, clip 1.0",
                "corpus": {"generator": "mlx_bridge.demo.task.corpus", "docs": args.docs, "seed": args.seed,
                           "forms": task.CORPUS_FORMS},
                "convert": "mlx_lm.convert(dtype=float32)",
                "final_loss": round(final_loss, 4), "seconds": round(seconds, 1),
                "heldout_accuracy_corpus_forms": acc, "mlx_vs_transformers_max_logit_diff": max_diff,
                "mlx": mx.__version__},
    )
    (mlx_dir / "README.md").write_text(model_card(config, manifest.recipe))
    manifest.files = {p.name: hash_file(p) for p in sorted(mlx_dir.iterdir()) if p.is_file()}
    manifest.save(mlx_dir)
    out = Path(args.out)
    with atomic_dir(out, force=True) as tmp:
        for p in mlx_dir.iterdir():
            shutil.copyfile(p, tmp / p.name)
    shutil.rmtree(work)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
