"""Which chat template a model plus adapters speaks: one rule for generate, chat, serve, eval, fuse.

1. `--chat-template FILE` overrides everything (`--chat-template none`: no template at all);
2. else the template the adapters were trained with (`elm finetune` records it in
   adapter_config.json), so a chat fine-tune is prompted the way it was trained;
3. else the model's own (`chat_template` in its tokenizer_config.json);
4. else none: prompts are fed as raw text.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from elm_spec.errors import ElmError
from elm_spec.modeldir import read_json

NO_TEMPLATE = "none"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SHIPPED_TEMPLATE = "openelm_instruct.jinja"


def shipped_chat_template() -> str:
    """The OpenELM-instruct chat format: `<|user|>\\n...</s><|assistant|>\\n...</s>`."""
    return resources.files("elm_spec.templates").joinpath(SHIPPED_TEMPLATE).read_text().rstrip("\n")


def resolve_chat_template(option: str | None, tokenizer_template: str | None) -> str | None:
    """The template fine-tuning data is rendered with: `--chat-template FILE`, else the
    tokenizer's, else the shipped one; `--chat-template none` disables the shipped fallback."""
    if option == NO_TEMPLATE:
        return tokenizer_template
    if option is not None:
        return read_template_file(option)
    return tokenizer_template if tokenizer_template else shipped_chat_template()


def read_template_file(option: str) -> str:
    """The text of a `--chat-template FILE`."""
    path = Path(option)
    if not path.is_file():
        raise ElmError(f"--chat-template {option}: file not found (give a Jinja file, or 'none')")
    return path.read_text().rstrip("\n")


def _recorded(path: Path) -> str | None:
    if not path.is_file():
        return None
    template = read_json(path).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ElmError(f"{path}: 'chat_template' must be a string")
    return template or None


def adapter_template(adapter_path: str | os.PathLike[str] | None) -> str | None:
    """The template recorded in an adapter directory's adapter_config.json, if any."""
    return None if adapter_path is None else _recorded(Path(adapter_path) / ADAPTER_CONFIG_FILE)


def model_template(model_dir: str | os.PathLike[str]) -> str | None:
    """The template of a model directory's tokenizer_config.json, if any."""
    return _recorded(Path(model_dir) / TOKENIZER_CONFIG_FILE)


def chat_template_for(model_dir: str | os.PathLike[str],
                      adapter_path: str | os.PathLike[str] | None = None,
                      override: str | None = None) -> str | None:
    """The template to render prompts with, by the rule in this module's docstring."""
    if override == NO_TEMPLATE:
        return None
    if override is not None:
        return read_template_file(override)
    return adapter_template(adapter_path) or model_template(model_dir)
