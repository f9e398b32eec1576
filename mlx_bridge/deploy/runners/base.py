"""Runners: prefill a left-padded batch, then decode one token per row; one per backend.

    runner.start(tokens (B, P), pad (B,), max_len) -> logits (B, V) float32   # prompt, new cache
    runner.next(token (B,))                       -> logits (B, V) float32   # one decode step
    runner.logits(input_ids (B, L))               -> logits (B, L, V) float32  # scoring, no cache

`Runner` declares it. The runners: `NativeRunner` (here, eager), `HFRunner` (here, transformers),
`fast.FastRunner` (fused, compiled, one CUDA graph per step; also the pipeline across GPUs that
`pipeline.place` sets up), which adds its own on-device loop `steps`. Continuous batching for the
server has its own interface over a KV-slot pool (`slots.SlotRunner`, `rows.RowRunner`).

`NativeRunner` drives the native `Transformer` through the pure `prefill`/`decode_step` functions
over a static KV cache; `HFRunner` drives any transformers causal LM with a `DynamicCache`, an
attention mask and position ids (its way of handling left padding).
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from ..native.layers import KVCache
from ..native.model import Transformer, decode_step, prefill


@runtime_checkable
class Runner(Protocol):
    """What `generation.token_chunks` and `DeployedModel` need from a backend."""

    vocab_size: int

    def start(self, tokens: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor: ...

    def next(self, token: torch.Tensor) -> torch.Tensor: ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


class NativeRunner:
    def __init__(self, module: Transformer):
        self.module = module
        self.vocab_size = module.args.vocab_size

    def start(self, tokens: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor:
        w = self.module.model.embed_tokens.weight
        self.cache = KVCache.allocate(self.module.args, tokens.shape[0], max_len, w.device, w.dtype)
        self.pad, self.slot = pad, tokens.shape[1]
        return prefill(self.module, self.cache, tokens, pad).float()

    def next(self, token: torch.Tensor) -> torch.Tensor:
        slot = torch.tensor([self.slot], device=token.device)
        self.slot += 1
        return decode_step(self.module, self.cache, token[:, None], slot, self.pad).float()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids).float()


class HFRunner:
    def __init__(self, module):
        from transformers import DynamicCache

        self.module, self._cache_cls = module, DynamicCache
        self.vocab_size = module.get_input_embeddings().num_embeddings
        # text alone goes straight to a multimodal wrapper's own causal LM where it has one (llama4: the same
        # computation; transformers 5.24's wrapper forward fails on text alone, reading `image_outputs`)
        lm = getattr(module, "language_model", None)
        self.text = lm if lm is not None and lm.get_output_embeddings() is not None else module
        params = inspect.signature(self.text.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _call(self, ids, pos):
        out = self.text(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                          **{self._cache_kw: self.cache})
        return out.logits[:, -1].float()

    def start(self, tokens: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor:
        B, P = tokens.shape
        self.cache = self._cache_cls()
        self.mask = (torch.arange(P, device=tokens.device)[None] >= pad[:, None]).long()  # [B, P]
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._call(tokens, self.pos)
        self.pos = self.pos[:, -1:]
        return logits

    def next(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        return self._call(token[:, None], self.pos)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids, use_cache=False).logits.float()
