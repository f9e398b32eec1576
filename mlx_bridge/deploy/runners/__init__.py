"""Runners drive a model for generation: eager (`base`), fast (fused, compiled, CUDA graphs), pipeline."""
