"""`DeployedModel`: an exported model loaded in PyTorch, with mlx-lm's tokenization and generation.

Calls are serialised by a lock (one generation at a time per model), held only while the runner
computes, never while a stream waits for its reader: a call that needs the runner while a stream is
paused first runs that stream to its end into a buffer the stream then reads from (so a partly read
stream blocks nobody, and using the model inside a stream's loop does not deadlock). The server
batches its requests itself (`serve.engine`).

Example:
    >>> from mlx_bridge import load                                     # doctest: +SKIP
    >>> m = load("deploy/alpaca")                                       # doctest: +SKIP
    >>> m.generate("Give three tips for staying healthy.", max_tokens=8)  # doctest: +SKIP
    'Eat well, sleep, walk'

`generate`/`stream` treat a plain prompt as an instruction (the chat template, when the tokenizer has
one, as the CLI does); `chat=False` continues raw text; `encode_prompt` + `complete` work on token ids.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import BridgeError
from .generation import Completion, RowText, TextStream, token_chunks
from .sampling import check_sampling

# start/end token pairs that mark a reasoning block (mlx_lm.tokenizer_utils._infer_thinking)
THINK_TOKENS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"), ("<|think:start|>", "<|think:end|>"),
                ("<|channel>", "<channel|>"))


@dataclass
class Row:
    """One prompt of a `run_rows` batch and what ends it."""

    prompt: list[int]
    max_tokens: int = 256
    stop: list[str] | None = None
    ignore_eos: bool = False
    on_text: Callable[[str], bool | None] | None = None  # streamed: each final piece; False ends the row
    on_done: Callable[[Completion], None] | None = None  # called as soon as the row ends


class DeployedModel:
    """A loaded export. `module` is a plain `torch.nn.Module` (native class or transformers')."""

    def __init__(self, module: torch.nn.Module, tokenizer, config: dict, device: torch.device, dtype: torch.dtype,
                 name: str, max_context: int, eos_token_ids: set[int], runner, backend: str):
        self.module, self.tokenizer, self.config = module, tokenizer, config
        self.device, self.dtype, self.name, self.max_context = device, dtype, name, max_context
        self.eos_token_ids, self.runner, self.backend = set(eos_token_ids), runner, backend
        self.last_completion: Completion | None = None
        self._lock = threading.Lock()
        self._paused: _Chunks | None = None  # the stream whose generation is under way on the runner

    def __repr__(self) -> str:
        return (f"DeployedModel({self.name!r}, backend={self.backend}, device={self.device}, dtype={self.dtype}, "
                f"max_context={self.max_context})")

    # -- prompts ---------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None,
                      chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids as mlx-lm makes them: a raw prompt gets BOS unless it already starts with it
        (`mlx_lm.stream_generate`); messages go through the chat template with the generation prompt,
        then are encoded without special tokens (`mlx_lm.generate` CLI, `mlx_lm.server`). As mlx-lm's
        `TokenizerWrapper` does, the template gets `enable_thinking` = whether the vocabulary has
        thinking tokens, unless `chat_template_kwargs` says otherwise.

        Example:
            >>> m.encode_prompt("hello")                                 # doctest: +SKIP
            [1, 52]
        """
        if (prompt is None) == (messages is None):
            raise BridgeError("prompt: give exactly one of prompt or messages")
        tok = self.tokenizer
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise BridgeError("messages: must be a list of {'role': ..., 'content': ...} objects")
            if not getattr(tok, "chat_template", None):
                raise BridgeError(f"{self.name}: the tokenizer has no chat template; pass a plain prompt")
            kw = {"enable_thinking": self._has_thinking, **(chat_template_kwargs or {})}
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
            return list(tok.encode(text, add_special_tokens=False))
        if not isinstance(prompt, str):
            raise BridgeError(f"prompt: must be a string, got {type(prompt).__name__}")
        bos = tok.bos_token
        return list(tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))

    @functools.cached_property
    def _has_thinking(self) -> bool:
        vocab = self.tokenizer.get_vocab()
        return any(a in vocab and b in vocab for a, b in THINK_TOKENS)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- generation ------------------------------------------------------------------------------------

    def _budget(self, prompts: list[list[int]], max_tokens: int) -> int:
        if not prompts:
            raise BridgeError("prompts: empty batch")
        for i, p in enumerate(prompts):
            if not p:
                raise BridgeError(f"prompts[{i}]: empty prompt")
            if len(p) >= self.max_context:
                raise BridgeError(f"prompts[{i}]: {len(p)} tokens do not fit the context of {self.max_context} "
                                  f"tokens of {self.name} (shorten the prompt)")
            bad = [t for t in p if not isinstance(t, int) or not 0 <= t < self._vocab]
            if bad:
                raise BridgeError(f"prompts[{i}]: token id {bad[0]!r} is outside the vocabulary (0..{self._vocab - 1})")
        return min(max_tokens, self.max_context - max(len(p) for p in prompts))

    @property
    def _vocab(self) -> int:
        return self.runner.vocab_size

    def complete(self, prompts: list[list[int]], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 ignore_eos: bool = False) -> list[Completion]:
        """Generate for a batch of token-id prompts (any lengths); one `Completion` per prompt.

        A row ends at EOS (unless `ignore_eos`), at a stop string, after `max_tokens` tokens, or at
        the end of the context ("length").

        Example:
            >>> m.complete([m.encode_prompt("hi"), m.encode_prompt("two plus two")], max_tokens=4)  # doctest: +SKIP
            [Completion(text=' hello', token_ids=[60], prompt_tokens=2, finish_reason='stop'), ...]
        """
        rows = [Row(p, max_tokens, stop, ignore_eos) for p in prompts]
        return self.run_rows(rows, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)

    def run_rows(self, rows: list["Row"], *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> list[Completion]:
        """One batch of rows, each with its own prompt, `max_tokens`, stop strings and, for streaming,
        an `on_text` callback that gets each final piece of text as it is decoded (returning False
        ends that row: its client went away), and an `on_done` callback that gets the row's
        `Completion` as soon as it ends (while longer rows go on). The server batches its requests
        through this.

        Example:
            >>> m.run_rows([Row(m.encode_prompt("hi"), 8), Row(m.encode_prompt("yo"), 4, on_text=print)])  # doctest: +SKIP
        """
        if not rows:
            raise BridgeError("prompts: empty batch")
        for r in rows:
            check_sampling(r.max_tokens, temperature, top_p, top_k)
        prompts = [r.prompt for r in rows]
        budget = self._budget(prompts, max(r.max_tokens for r in rows))
        texts = [RowText(self.decode, set() if r.ignore_eos else self.eos_token_ids, r.stop, min(r.max_tokens, budget),
                         pieces=r.on_text is not None) for r in rows]

        done = [False] * len(rows)

        def emit(b: int, piece: str) -> None:
            if piece and rows[b].on_text is not None and rows[b].on_text(piece) is False:
                texts[b].close("cancelled")
            if texts[b].reason is not None and not done[b]:
                done[b] = True
                if rows[b].on_done is not None:
                    rows[b].on_done(texts[b].completion(len(rows[b].prompt)))

        with self._lock:
            self._free_runner()
            chunks = token_chunks(self.runner, prompts, budget, self.device, temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=seed, pad_id=self._pad_id)
            try:
                for chunk in chunks:
                    for b, t in enumerate(texts):
                        if t.reason is None:
                            emit(b, t.add([step[b] for step in chunk]))
                    if all(done):
                        break
            finally:
                chunks.close()
            for b, t in enumerate(texts):
                emit(b, t.close())
        return [t.completion(len(r.prompt)) for t, r in zip(texts, rows)]

    def stream_ids(self, prompt_ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop: list[str] | None = None) -> TextStream:
        """Stream the text of one prompt piece by piece; the returned iterator's `.last_completion`
        (and this model's) is set when it is exhausted.

        Example:
            >>> s = m.stream_ids(m.encode_prompt("hi"), max_tokens=4)  # doctest: +SKIP
            >>> "".join(s) == s.last_completion.text                   # doctest: +SKIP
            True
        """
        check_sampling(max_tokens, temperature, top_p, top_k)
        budget = self._budget([prompt_ids], max_tokens)

        def chunks():
            return token_chunks(self.runner, [prompt_ids], budget, self.device, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, pad_id=self._pad_id)

        def done(c):
            self.last_completion = c

        return TextStream(_Chunks(self, chunks), self.decode, self.eos_token_ids, stop, len(prompt_ids), budget, done)

    def _free_runner(self) -> None:
        """(Lock held.) Let a paused stream finish its generation into its buffer: the runner is free."""
        if self._paused is not None:
            self._paused.finish()

    def chat_ids(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids of a plain prompt as `mlx-bridge generate` (and `mlx_lm.generate`'s CLI) makes
        them: one user message through the chat template when the tokenizer has one, the raw text
        otherwise. `chat=False` always tokenizes the raw text; `chat=True` requires a template.

        Example:
            >>> m.chat_ids("hi") == m.encode_prompt(messages=[{"role": "user", "content": "hi"}])  # doctest: +SKIP
            True
        """
        if chat is None:
            chat = bool(getattr(self.tokenizer, "chat_template", None))
        if chat:
            if not isinstance(prompt, str):
                raise BridgeError(f"prompt: must be a string, got {type(prompt).__name__}")
            return self.encode_prompt(messages=[{"role": "user", "content": prompt}])
        return self.encode_prompt(prompt)

    def _ids(self, prompt: str | None, messages: list[dict] | None, chat: bool | None) -> list[int]:
        if messages is not None and chat is False:
            raise BridgeError("chat=False: messages always go through the chat template; pass a prompt")
        if prompt is None or messages is not None:
            return self.encode_prompt(prompt, messages)  # messages, or the error for neither / both
        return self.chat_ids(prompt, chat)

    def generate(self, prompt: str | list[str] | None = None, *, messages: list[dict] | None = None,
                 chat: bool | None = None, **sampling) -> str | list[str]:
        """The new text only (as `mlx_lm.generate` returns it); a list of prompts gives a list.

        A plain prompt is an instruction: it goes through the tokenizer's chat template as one user
        message when the tokenizer has one, as `mlx-bridge generate` and `mlx_lm.generate`'s CLI do;
        `chat=False` continues the raw text instead (`mlx_lm.generate(model, tokenizer, prompt)`).

        Example:
            >>> m.generate("Give three tips for staying healthy.", max_tokens=32, temperature=0.7, seed=0)  # doctest: +SKIP
            >>> m.generate("Once upon a time", chat=False, max_tokens=32)  # doctest: +SKIP
        """
        if isinstance(prompt, list):
            if messages is not None:
                raise BridgeError("prompt: give a list of prompts or messages, not both")
            return [c.text for c in self.complete([self.chat_ids(p, chat) for p in prompt], **sampling)]
        return self.complete([self._ids(prompt, messages, chat)], **sampling)[0].text

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, chat: bool | None = None,
               **sampling) -> Iterator[str]:
        """Text pieces of one generation as they are decoded (prompts as in `generate`).

        Example:
            >>> for piece in m.stream(messages=[{"role": "user", "content": "Hi"}]): print(piece, end="")  # doctest: +SKIP
        """
        return self.stream_ids(self._ids(prompt, messages, chat), **sampling)

    # -- scoring ---------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) float32 of full sequences, no cache (what `verify` compares).

        Example:
            >>> m.logits(torch.tensor([[1, 52, 60]])).shape              # doctest: +SKIP
            torch.Size([1, 3, 101])
        """
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise BridgeError(f"input_ids: expected a non-empty (B, L) array, got shape {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self._vocab:
            raise BridgeError(f"input_ids: ids must be in 0..{self._vocab - 1}, got {int(input_ids.min())}.."
                              f"{int(input_ids.max())}")
        with self._lock, torch.inference_mode():
            self._free_runner()
            return self.runner.logits(input_ids.to(self.device))

    @property
    def _pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid) if pid is not None else 0


class _Chunks:
    """The token chunks of one stream, computed under the model's lock one chunk per `next` (the lock
    is never held while the reader has the chunk). Another call that needs the runner meanwhile
    calls `finish`, which runs the rest of this generation into a buffer read from afterwards."""

    def __init__(self, model: DeployedModel, make: Callable[[], Iterator]):
        self._model, self._make = model, make
        self._it: Iterator | None = None
        self._buf: deque = deque()
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        m = self._model
        with m._lock, torch.inference_mode():  # (a generator resumed on another thread has lost its own)
            if self._buf:
                return self._buf.popleft()
            if self._done:
                raise StopIteration
            if m._paused is not self:
                m._free_runner()
                m._paused = self
                self._it = self._make()
            try:
                return next(self._it)
            except StopIteration:
                self._end()
                raise

    def finish(self) -> None:
        """(Lock held.) Run the rest of the generation into the buffer."""
        try:
            with torch.inference_mode():
                self._buf.extend(self._it)
        finally:
            self._end()

    def _end(self) -> None:
        self._done = True
        if self._model._paused is self:
            self._model._paused = None

    def close(self) -> None:
        with self._model._lock:
            if self._it is not None and not self._done:
                self._it.close()
            self._end()
