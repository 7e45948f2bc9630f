"""Conversations to token ids, the one way both twins' fine-tuning data is tokenized.

A `ChatCodec` is what a tokenizer must offer: `encode` (text to ids, no bos/eos added), the
bos and eos ids, and `render` through its chat template (`chat_template` None: no template).
The MLX side passes its HF tokenizer (elm_mlx.lora.data.Encoder); the PyTorch side passes
elm_spec.tokenizer.Tokenizer through `SentencePieceCodec`, which renders the template as
transformers' `apply_chat_template` does, so both produce the same ids.

Conversations are tokenized piece by piece: each prompt part exactly as
`apply_chat_template(..., add_generation_prompt=True)` renders it at generation time, each
assistant part on its own, so training sees the token boundaries that generation will.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any, Protocol

from elm_spec.errors import ElmError
from elm_spec.tokenizer import BOS_ID, EOS_ID, Tokenizer

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatCodec(Protocol):
    chat_template: str | None

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def render(self, messages: list[Message], generation_prompt: bool) -> str: ...


def check_messages(messages: Any, where: str, key: str = "messages") -> list[Message]:
    """A non-empty list of {role, content} messages, or one error naming WHERE and KEY."""
    if not isinstance(messages, list) or not messages:
        raise ElmError(f"{where}: \"{key}\" must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ElmError(f"{where}: {key}[{index}] needs a role of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ElmError(f"{where}: {key}[{index}] needs a string \"content\"")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_pieces(codec: ChatCodec, messages: list[Message], where: str
                        ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, assistant ids) for each assistant message: the prompt part is what the
    template renders since the previous assistant message, up to the generation prompt."""
    pieces: list[tuple[list[int], list[int]]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not message["content"].strip():
            raise ElmError(f"{where}: messages[{index}] is an empty assistant message")
        prompt = codec.render(messages[:index], generation_prompt=True)
        full = codec.render(messages[: index + 1], generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ElmError(f"{where}: the chat template does not render conversations "
                           "prefix by prefix, so prompt tokens cannot be masked")
        pieces.append((codec.encode(prompt[len(rendered):]), codec.encode(full[len(prompt):])))
        rendered = full
    return pieces


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """TEMPLATE compiled in the sandbox transformers renders chat templates in."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


class SentencePieceCodec:
    """elm_spec.tokenizer.Tokenizer as a ChatCodec (the PyTorch side's tokenizer)."""

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike[str], chat_template: str | None):
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.chat_template = chat_template

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise ElmError("no chat template to render a conversation with")
        try:
            return _compiled(self.chat_template).render(
                messages=messages, add_generation_prompt=generation_prompt,
                bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        except Exception as error:  # a template's own raise_exception or a Jinja error
            raise ElmError(f"the chat template failed to render: {error}") from None
