"""Records -> token ids and an exact loss mask.

Every example is `tokens` (T,) int32 and `mask` (T,) bool, where `mask[t]` says that token t is a loss
target (predicted from tokens < t). With prompt masking only the response tokens are targets: every
assistant turn of a chat (its content and the template's end-of-turn tokens), the completion of a
prompt/completion record, the output of an alpaca record. Token 0 of a sequence is never a target.

Templates:
    chat_template  the tokenizer's chat template (alpaca -> one user turn, completions -> user/assistant)
    alpaca         the Stanford Alpaca prompt text, then the output and EOS (tokenizers without a template)
    plain          prompt + completion + EOS (completions, tokenizers without a template)
    text           (text format) the text and EOS; every token is a target

Where a template renders a prompt that is not a prefix of the full conversation, the response starts at
the longest common prefix, so the prompt tokens are never trained.

Example:
    >>> tok = __import__("mlx_bridge.testing", fromlist=["x"]).tiny_tokenizer("/tmp/doc-tok")  # doctest: +SKIP
    >>> ex = encode_record({"prompt": "hi", "completion": "hello"}, "completions", "chat_template", tok, True)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..errors import BridgeError
from .data import sharegpt_messages
from .log import phase

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: token t is a loss target


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(fmt: str, tokenizer, template: str | None) -> str:
    """The template a format uses: the given one, else the tokenizer's chat template when it has one."""
    if fmt == "text":
        if template not in (None, "plain"):
            raise BridgeError(f"template: {template!r} does not apply to the text format")
        return "text"
    if fmt in ("chat", "sharegpt") and template not in (None, "chat_template"):
        raise BridgeError(f"template: the chat format needs the tokenizer's chat template, not {template!r}")
    if template is None:
        template = "chat_template" if has_chat_template(tokenizer) else ("plain" if fmt == "completions" else "alpaca")
    if template == "chat_template" and not has_chat_template(tokenizer):
        raise BridgeError(f"tokenizer: has no chat template, which the {fmt} format needs here "
                          "(use template 'alpaca' or 'plain')")
    return template


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):  # a BatchEncoding from some tokenizers
        x = x["input_ids"]
    return list(x)


def _chat(tokenizer, messages: list[dict], tools, **kw) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tools=tools, return_dict=False, **kw))


def encode_chat(tokenizer, messages: list[dict], tools, mask_prompt: bool) -> Example:
    """Tokens of a conversation; targets are the assistant turns (or everything after token 0)."""
    full = _chat(tokenizer, messages, tools)
    mask = np.zeros(len(full), bool)
    if not mask_prompt:
        mask[1:] = True
    else:
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = _lcp(_chat(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else [], full)
            end = len(full) if i == len(messages) - 1 else _lcp(_chat(tokenizer, messages[: i + 1], tools), full)
            mask[max(start, 1):end] = True
    return Example(np.asarray(full, np.int32), mask)


def encode_prompt_response(tokenizer, prompt: str, response: str, mask_prompt: bool) -> Example:
    """Tokens of prompt + response + EOS; targets are the response and EOS."""
    full = _ids(tokenizer.encode(prompt + response))
    eos = tokenizer.eos_token_id
    if eos is not None and (not full or full[-1] != eos):
        full.append(eos)
    mask = np.zeros(len(full), bool)
    start = _lcp(_ids(tokenizer.encode(prompt)), full) if mask_prompt else 1
    mask[max(start, 1):] = True
    return Example(np.asarray(full, np.int32), mask)


def alpaca_user_text(r: dict) -> str:
    return r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")


def encode_record(r: dict, fmt: str, template: str, tokenizer, mask_prompt: bool) -> Example:
    """One record -> Example (see the module docstring for what is a target)."""
    if fmt == "text":
        return encode_prompt_response(tokenizer, "", r["text"], False)
    if template == "chat_template":
        if fmt == "chat":
            return encode_chat(tokenizer, r["messages"], r.get("tools"), mask_prompt)
        if fmt == "sharegpt":
            return encode_chat(tokenizer, sharegpt_messages(r["conversations"]), r.get("tools"), mask_prompt)
        user = alpaca_user_text(r) if fmt == "alpaca" else r["prompt"]
        reply = r["output"] if fmt == "alpaca" else r["completion"]
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return encode_chat(tokenizer, msgs, r.get("tools"), mask_prompt)
    if fmt == "alpaca":
        prompt = (ALPACA_PROMPT_INPUT if r.get("input") else ALPACA_PROMPT).format(**{"input": "", **r})
        return encode_prompt_response(tokenizer, prompt, r["output"], mask_prompt)
    return encode_prompt_response(tokenizer, r["prompt"], r["completion"], mask_prompt)


def tokenize_split(records: list[dict], where: list[str], fmt: str, template: str, tokenizer,
                   mask_prompt: bool, max_seq_len: int, split: str = "train",
                   context: int | None = None, quiet: bool = False) -> tuple[list[Example], dict]:
    """Tokenize a split; truncate to `max_seq_len` (or to the model's `context` when that is shorter)
    with one warning that counts the truncated examples.

    Examples left without a target after truncation are dropped (counted in the same warning).
    Returns the examples and counts {examples, truncated, dropped, tokens, target_tokens, longest}.
    """
    limit = min(max_seq_len, context) if context else max_seq_len
    out: list[Example] = []
    truncated = dropped = longest = 0
    for r, w in phase(zip(records, where), f"tokenize {split}", len(records), quiet):
        try:
            ex = encode_record(r, fmt, template, tokenizer, mask_prompt)
        except BridgeError:
            raise
        except Exception as e:  # a template that rejects the conversation, say
            raise BridgeError(f"{w}: could not apply the {template} template ({type(e).__name__}: {e})") from None
        longest = max(longest, len(ex.tokens))
        if len(ex.tokens) > limit:
            truncated += 1
            ex = Example(ex.tokens[:limit], ex.mask[:limit])
        if not ex.mask.any():
            dropped += 1
            continue
        out.append(ex)
    if truncated or dropped:
        what = (f"the model's context of {context} tokens (max_position_embeddings)" if limit != max_seq_len
                else f"max_seq_len={max_seq_len} tokens")
        extra = f"; {dropped} had no response tokens left and were dropped" if dropped else ""
        print(f"warning: {split}: {truncated} of {len(records)} examples are longer than {what} (longest "
              f"{longest}): they are truncated to {limit} tokens, and the tokens past that are not trained{extra}",
              file=sys.stderr)
    if not out:
        raise BridgeError(f"{split} split: no example has a response token to train on")
    stats = {"examples": len(out), "truncated": truncated, "dropped": dropped, "longest": longest,
             "tokens": int(sum(len(e.tokens) for e in out)), "target_tokens": int(sum(e.mask.sum() for e in out))}
    return out, stats
