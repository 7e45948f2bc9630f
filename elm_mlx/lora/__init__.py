"""Fine-tuning the MLX twin: LoRA, DoRA, QLoRA and full, with mlx-lm-compatible adapters."""


def quiet_transformers() -> None:
    """transformers warns that `openelm` is not one of its model types when it reads the
    tokenizer; harmless, and on the command line it would bury the one line a failure prints."""
    from transformers.utils import logging

    logging.set_verbosity_error()
