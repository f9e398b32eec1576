"""`--gguf-type`: the file type, the tensor type llama.cpp's quantizer picks per tensor, and the quantizers.

`TypePicker` follows `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp for the file types we
write (no importance matrix, no overrides): which tensors stay float (1-D, norms, the MoE router),
the `_M` mixes (more bits for attn_v / ffn_down in `use_more_bits` layers, Q6_K for the output),
and the fallback for rows that don't fill a block. So `--gguf-type q4_k_m` gives the tensor types
`llama_model_quantize(f32.gguf, Q4_K_M)` gives, and with the numpy K-quants the same bytes.

Example:
    >>> p = TypePicker("q4_k_m", n_layer=8, n_attn_v=8, n_expert=0, tied=False)
    >>> [p.pick(n, s).name for n, s in [("blk.0.attn_v.weight", (256, 256)), ("blk.0.attn_q.weight", (256, 256)),
    ...                                 ("blk.0.attn_norm.weight", (256,)), ("output.weight", (32, 256))]]
    ['Q6_K', 'Q4_K', 'F32', 'Q6_K']
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT
from gguf import quants as gq

from .kquants import QUANTIZERS

# --gguf-type -> (llama_ftype, its default tensor type)
GGUF_TYPES: dict[str, tuple[FT, T]] = {
    "f32": (FT.ALL_F32, T.F32), "f16": (FT.MOSTLY_F16, T.F16), "bf16": (FT.MOSTLY_BF16, T.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, T.Q8_0), "q4_0": (FT.MOSTLY_Q4_0, T.Q4_0),
    "q6_k": (FT.MOSTLY_Q6_K, T.Q6_K), "q5_k_m": (FT.MOSTLY_Q5_K_M, T.Q5_K), "q4_k_m": (FT.MOSTLY_Q4_K_M, T.Q4_K),
}
FLOAT = (T.F32, T.F16, T.BF16)
# tensor_type_fallback: a row that doesn't fill a 256-block
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# substrings of tensor names llama.cpp never quantizes (of those our archs have)
KEEP = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d",  # llama-quant.cpp; ssm_conv1d: Mamba
        "shortconv.conv.weight",  # LFM2
        "position_embd.weight")  # GPT-2, StarCoder: llama.cpp keeps learned positions unquantized


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    """tensor_get_category, in its order of checks."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in name:
            return "attn_v" if cat in ("attn_qkv", "attn_kv_b") else cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a tensor with numpy `shape`: ggml's trailing dims of size 1 (numpy's leading) don't count.

    Example:
        >>> ggml_n_dims((1, 64)), ggml_n_dims((4, 1, 64)), ggml_n_dims((64,))
        (1, 3, 1)
    """
    lead = next((i for i, n in enumerate(shape) if n > 1), len(shape))
    return max(1, len(shape) - lead)


class TypePicker:
    """Tensor types for one file, picked in file order (the attn_v / ffn_down counters depend on it)."""

    def __init__(self, gguf_type: str, n_layer: int, n_attn_v: int, n_expert: int, tied: bool):
        self.ftype, self.default = GGUF_TYPES[gguf_type]
        self.n_layer, self.n_attn_v, self.n_expert, self.tied = n_layer, n_attn_v, n_expert, tied
        self.i_attn_v = self.i_ffn_down = 0

    @classmethod
    def for_file(cls, gguf_type: str, cfg: dict, names: set[str], n_expert: int) -> "TypePicker":
        """The picker for a file of tensors `names` and `expert_count` key `n_expert` (llama.cpp's hparams.n_expert,
        0 when the file has none): attn_v-like weights counted as llama.cpp counts them (`category_is_attn_v`:
        attn_v, attn_qkv, attn_kv_b weights, never their biases)."""
        n_attn_v = sum(_category(n) == "attn_v" for n in names)
        return cls(gguf_type, cfg["num_hidden_layers"], n_attn_v, n_expert, "output.weight" not in names)

    def pick(self, name: str, shape: tuple[int, ...]) -> T:
        """Type of tensor `name` with numpy `shape` (rows last), given it is float32 at the source."""
        if len(shape) < 2 or not name.endswith("weight") or any(k in name for k in KEEP):
            return T.F32
        t = self.default
        if t in FLOAT:
            return t
        if ggml_n_dims(shape) < 2:  # llama_model_quantize keeps what ggml counts as 1-D, e.g. (1, n): F32 here
            return T.F32
        t = self._mix(name, shape, t)
        ncols = shape[-1]
        if ncols % GGML_QUANT_SIZES[t][0]:
            t = FALLBACK.get(t, t)
            if ncols % GGML_QUANT_SIZES[t][0]:
                t = T.F16
        return t

    def _mix(self, name: str, shape: tuple[int, ...], t: T) -> T:
        ft, cat = self.ftype, _category(name)
        mixed = ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M)
        if cat == "output" or (self.tied and cat == "token_embd"):
            if shape[-1] % GGML_QUANT_SIZES[t][0]:
                return T.Q8_0
            return t if t == T.Q8_0 else T.Q6_K
        if cat == "attn_v":
            if mixed and use_more_bits(self.i_attn_v, self.n_attn_v):
                t = T.Q6_K
            if self.n_expert == 8:
                t = T.Q8_0
            self.i_attn_v += 1
        elif cat == "attn_k" and self.n_expert == 8:
            t = T.Q8_0
        elif cat == "ffn_down":
            i = int(name.split(".")[1]) if self.n_expert > 1 else self.i_ffn_down
            if mixed and use_more_bits(i, self.n_layer):
                t = T.Q6_K
            self.i_ffn_down += 1
        elif cat == "attn_output" and self.n_expert == 8 and ft == FT.MOSTLY_Q4_K_M:
            t = T.Q5_K
        return t


ROUNDF = np.nextafter(np.float32(0.5), np.float32(0))  # trunc(v + copysign(it, v)) is C's roundf(v) for |v| < 128
_SIGN, _ROUNDF_BITS = np.uint32(0x80000000), ROUNDF.view(np.uint32)


def quantize_q8_0(x: np.ndarray, step: int = 4096) -> np.ndarray:
    """float32 (..., k·32) -> Q8_0 bytes (..., k·34): fp16 d, 32 int8 per block, as `quantize_row_q8_0_ref`
    (gguf-py's Q8_0 writes the same bytes, 3x slower). `step` blocks at a time (the working set in L2):
    max |x| of each block from the blocks seen as 8 rows of 16-byte columns (one cheap transpose, then
    row-by-row max and min), the quants as trunc(x·id + copysign(0.5 - ulp, x·id)) cast straight into
    the output (C's roundf, halves away from zero).

    Example:
        >>> quantize_q8_0(np.full((1, 32), 0.5, np.float32))[0, 2:4].view(np.int8).tolist()
        [127, 127]
    """
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    n = len(b)
    out = np.empty((n, 34), np.uint8)
    qs, dh = out[:, 2:].view(np.int8), out[:, :2].view(np.float16)[:, 0]
    s = max(1, min(step, n))
    cols = np.empty((8, s), np.complex128)  # column i: block i's 32 values as 8 rows of 4 (16 bytes)
    v = np.empty((s, 32), np.float32)
    half = cols.view(np.uint32).reshape(s, 32)  # reused once the max is known
    for i in range(0, n, s):
        blk = b[i:i + s]
        m = len(blk)
        c = cols[:, :m]
        np.copyto(c, blk.view(np.complex128).T)
        hi = np.maximum.reduce(c.view(np.float32), axis=0).reshape(m, 4)
        lo = np.minimum.reduce(c.view(np.float32), axis=0).reshape(m, 4)
        np.maximum(hi, np.negative(lo, out=lo), out=hi)
        d = np.maximum(np.maximum(hi[:, 0], hi[:, 1]), np.maximum(hi[:, 2], hi[:, 3]))
        np.abs(d, out=d)  # +0 for a block of zeros, as C's fabsf
        d /= np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        vm, hm = v[:m], half[:m]
        np.multiply(blk, inv[:, None], out=vm)
        np.bitwise_and(vm.view(np.uint32), _SIGN, out=hm)
        hm |= _ROUNDF_BITS
        vm += hm.view(np.float32)
        np.copyto(qs[i:i + m], vm, casting="unsafe")  # float -> int8 truncates
        dh[i:i + m] = d
    return out.reshape(*x.shape[:-1], -1)


def quantize(x: np.ndarray, t: T) -> np.ndarray:
    """float32 array -> the bytes of type `t` (float types as their numpy dtype).

    Example:
        >>> quantize(np.ones((2, 32), np.float32), T.Q8_0).shape
        (2, 34)
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if t == T.F32:
        return x
    if t == T.F16:
        return x.astype(np.float16)
    if t == T.Q8_0:
        return quantize_q8_0(x)
    if t.name in QUANTIZERS:
        return QUANTIZERS[t.name](x)
    return gq.quantize(x, t)


def nbytes(shape: tuple[int, ...], t: T) -> int:
    block, size = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape))
    return n // block * size
