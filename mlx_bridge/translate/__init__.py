"""Framework-free translator: MLX checkpoints -> Hugging Face / PEFT (numpy + ml_dtypes; no mlx, no torch)."""
