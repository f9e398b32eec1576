"""Tiny models for tests and benchmarks: built from configs, no downloads.

`tiny_tokenizer(dir)` writes a small word-level tokenizer with a chat template; `tiny_hf_model(dir,
model_type)` writes a random transformers model of that type (2 layers, hidden 64) with the tokenizer;
`mlx_convert(hf_dir, out)` runs mlx-lm's own converter on it (needs the `train` extra).
"""

from .models import ARCH_CONFIGS, mlx_convert, tiny_hf_model, tiny_tokenizer

__all__ = ["ARCH_CONFIGS", "mlx_convert", "tiny_hf_model", "tiny_tokenizer"]
