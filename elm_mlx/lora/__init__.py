"""Fine-tuning the MLX twin: LoRA, DoRA, QLoRA and full, with mlx-lm-compatible adapters."""

