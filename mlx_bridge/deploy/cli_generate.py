"""`mlx-bridge generate DIR --prompt ...`: stream a completion from an export, like `mlx_lm.generate`.

As mlx-lm's CLI does, the prompt goes through the tokenizer's chat template (as one user message,
after `--system-prompt` if given) unless the tokenizer has none or `--ignore-chat-template` is set.

Example:
    mlx-bridge generate deploy/alpaca --prompt "Give three tips for staying healthy." --max-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import time

from .loader import add_load_arguments


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="DIR", help="export directory (Hugging Face layout)")
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="tokenize the prompt as raw text")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_load_arguments(p, default_device="auto")
    p.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed to stderr")


def main(args: argparse.Namespace) -> int:
    from .loader import load_from_args

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    t0 = time.perf_counter()
    model = load_from_args(args.model, args)
    t_load = time.perf_counter() - t0
    chat = False if args.ignore_chat_template else None  # None: the template when the tokenizer has one
    if args.system_prompt and chat is None and getattr(model.tokenizer, "chat_template", None):
        ids = model.encode_prompt(messages=[{"role": "system", "content": args.system_prompt},
                                            {"role": "user", "content": prompt}])
    else:
        ids = model.chat_ids(prompt, chat)
    t1 = time.perf_counter()
    stream = model.stream_ids(ids, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    c = stream.last_completion
    if args.verbose and c is not None:
        dt = time.perf_counter() - t1
        print(f"{model!r}: loaded in {t_load:.2f}s; prompt {c.prompt_tokens} tokens, generated "
              f"{len(c.token_ids)} tokens in {dt:.2f}s ({len(c.token_ids) / max(dt, 1e-9):.1f} tokens/s), "
              f"finish_reason={c.finish_reason}", file=sys.stderr)
    return 0
