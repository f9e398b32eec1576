"""The native PyTorch model class (gpt-fast style) for the llama family and the MoE archs.

One `Transformer` covers llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text and the MoE types;
what differs between them is data in `ModelArgs`. Parameter names are Hugging Face's (`model.layers.0.
self_attn.q_proj.weight`, `...block_sparse_moe.experts.3.w1.weight`), so an export's safetensors load
with `load_state_dict(strict=True)`. A tied model has no `lm_head` (the embedding is used), exactly
the keys transformers saves.

Two entry points:
    forward(input_ids)                          -> logits (B, L, V): plain causal pass, no cache
    step(input_ids, slots, pad, cache, kv_len)  -> logits: writes keys/values at cache `slots`
`slots` (L,) are cache positions shared by the batch; `pad` (B,) counts each row's left padding, so a
row's rope position is slot - pad and its padded slots are masked. A decode step has only tensor
inputs and static shapes (kv_len=None attends over the whole cache), so it can be captured in a CUDA
graph.

Example:
    >>> import torch
    >>> from mlx_bridge.deploy.native.config import ModelArgs, RopeArgs
    >>> a = ModelArgs("llama", 32, 16, 32, 1, 2, 1, 8, windows=[None], ropes=[RopeArgs(dim=8)])
    >>> Transformer(a)(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 32])
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelArgs
from .layers import DecoderLayer, KVCache, make_norm
from .moe import GROUP_ROUTED
from .rope import cos_sin, inv_freq


class Backbone(nn.Module):  # "model." in Hugging Face names
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(a, i) for i in range(a.num_layers)])
        self.norm = make_norm(a)


def masks(q_slots: torch.Tensor, S: int, pad: torch.Tensor | None, windows) -> dict:
    """window (None = full) -> bool mask (B|1, 1, L, S) for queries at `q_slots` (L,) over S keys:
    causal, within the window, not padding (`pad` (B,) left-padding lengths, or None)."""
    k = torch.arange(S, device=q_slots.device)
    q = q_slots[:, None]
    causal = k[None, :] <= q  # [L, S]
    out = {}
    for w in [None, *windows]:
        m = causal if w is None else causal & (q - k[None, :] < w)
        if pad is not None:  # a padded query still sees itself, so no softmax row is empty
            m = m[None] & ((k[None, None, :] >= pad[:, None, None]) | (k[None, None, :] == q[None]))
        else:
            m = m[None]
        out[w] = m[:, None]
    return out


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = Backbone(a)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=a.lm_head_bias)
        # one inverse-frequency buffer per distinct rope setting (gemma3: local and global)
        self._ropes = []
        self.rope_of_layer = []
        for r in a.ropes:
            if r not in self._ropes:
                self._ropes.append(r)
            self.rope_of_layer.append(self._ropes.index(r))
        self.windows = sorted({w for w in a.windows if w is not None})
        self.reset_rope()
        # tensors transformers keeps in float32 in every dtype (`_keep_in_fp32_modules_strict`)
        self.fp32_keys = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias") if a.moe in GROUP_ROUTED else ()

    def reset_rope(self, device=None) -> None:
        """(Re)compute the rope buffers in float32 (after building on the meta device, or a dtype cast)."""
        device = device or self.model.norm.weight.device
        if device.type == "meta":
            device = None  # real values even when the parameters are still on meta
        self.rope_scale = []
        for j, r in enumerate(self._ropes):
            inv, scale = inv_freq(r)
            self.register_buffer(f"rope_inv_freq_{j}", inv.to(device), persistent=False)
            self.rope_scale.append(scale)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.reset_rope()  # .to(device/dtype) moves the rope buffers; keep them float32, exact
        return out

    def stack_experts(self) -> None:
        """Stack every MoE layer's experts into (E, 2I, D) / (E, D, I) tensors on their device, once
        (after loading weights; the per-expert parameters become views of them)."""
        for layer in self.model.layers:
            ffn = getattr(layer, layer.ffn_name)
            if hasattr(ffn, "stack"):
                ffn.stack()

    def _masks(self, q_slots, S: int, pad) -> dict:
        return masks(q_slots, S, pad, self.windows)

    def _run(self, input_ids, pos, masks, cache=None, slots=None, kv_len=None, last_only=False):
        a = self.args
        h = self.model.embed_tokens(input_ids)  # [B, L, D]
        if a.gemma:
            h = h * torch.tensor(a.hidden_size ** 0.5).to(h.dtype).item()  # sqrt(D) rounded to the dtype
        rot = [cos_sin(getattr(self, f"rope_inv_freq_{j}"), self.rope_scale[j], pos, h.dtype)
               for j in range(len(self._ropes))]
        for i, layer in enumerate(self.model.layers):
            cos, sin = rot[self.rope_of_layer[i]]
            c = None if cache is None else (cache.k[i], cache.v[i])
            h = layer(h, cos, sin, masks[a.windows[i]], c, slots, kv_len)
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        logits = self.lm_head(h) if not a.tie_word_embeddings else nn.functional.linear(h, self.model.embed_tokens.weight)
        if a.final_softcap:
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        return logits  # [B, L, V] in the model dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) for full sequences (no padding, no cache)."""
        L = input_ids.shape[1]
        slots = torch.arange(L, device=input_ids.device)
        if self.windows:
            masks = self._masks(slots, L, None)
        else:
            masks = {None: None}  # SDPA's own causal mask
        return self._run(input_ids, slots[None].expand(input_ids.shape[0], L), masks)

    def step(self, input_ids, slots, pad, cache: KVCache, kv_len: int | None = None, last_only: bool = False):
        """Run tokens (B, L) at cache `slots` (L,) with per-row left padding `pad` (B,); return logits.

        kv_len: attend over cache slots [0, kv_len) (prefill); None attends over the whole cache
        (decode: static shapes).
        """
        S = cache.max_len if kv_len is None else kv_len
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, L] rope positions
        return self._run(input_ids, pos, self._masks(slots, S, pad), cache, slots, kv_len, last_only)


def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Run left-padded prompts (B, P) into an empty cache; return the last position's logits (B, V)."""
    P = tokens.shape[1]
    slots = torch.arange(P, device=tokens.device)
    return model.step(tokens, slots, pad, cache, kv_len=P, last_only=True)[:, -1]


def decode_step(model: Transformer, cache: KVCache, token: torch.Tensor, slot: torch.Tensor,
                pad: torch.Tensor) -> torch.Tensor:
    """One token per row (B, 1) at cache slot `slot` (1,); logits (B, V). Static shapes, no host sync."""
    return model.step(token, slot, pad, cache, kv_len=None)[:, -1]
