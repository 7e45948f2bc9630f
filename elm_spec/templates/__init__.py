"""Chat templates shipped with elm (Jinja, in the format of HF tokenizer_config.json)."""
