"""A multi-turn chat with one KV cache kept across turns, behind `elm chat`.

Each turn renders the whole conversation with the chat template (`elm_mlx.load` picks it),
keeps the cached prefix that the new rendering shares with what the cache holds, trims the
rest, and prefills only the new tokens: on turn N only turn N's text (plus the template's
glue) goes through the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from elm_mlx.generate import encode_messages, stream_generate
from elm_mlx.prompt_cache import reuse_prefix
from elm_spec import ElmError


@dataclass
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    prefilled_tokens: int  # what went through the model this turn
    generation_tokens: int = 0
    generation_tps: float = 0.0


@dataclass
class ChatSession:
    model: nn.Module
    tokenizer: TokenizerWrapper
    system_prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # stream_generate's sampling options
    draft_model: nn.Module | None = None
    # where each conversation starts: a saved (cache, the tokens it holds); None: empty
    start: Callable[[], tuple[list[Any], list[int]]] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    cache: list[Any] = field(init=False)
    cached: list[int] = field(default_factory=list)  # the tokens the cache holds

    def __post_init__(self) -> None:
        if self.draft_model is not None and self.options.get("kv_bits") is not None:
            # mlx-lm's speculative decoding quantizes copies of the cache it was given, so the
            # cache kept across turns would stop following the conversation
            raise ElmError("--kv-bits does not combine with --draft-model in a chat")
        if self.draft_model is not None and self.start is not None:
            raise ElmError("--prompt-cache-file does not combine with --draft-model (the file "
                           "holds no cache for the draft)")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache (back to the
        saved one, if the session starts from one)."""
        self.messages = []
        self._fresh_cache()

    def _fresh_cache(self) -> None:
        if self.start is not None:
            self.cache, self.cached = self.start()
        else:
            self._empty_cache()

    def _empty_cache(self) -> None:
        self.cache = make_prompt_cache(self.model)
        if self.draft_model is not None:
            self.cache += make_prompt_cache(self.draft_model)
        self.cached = []

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def _reuse(self, ids: list[int]) -> list[int]:
        """Trim the cache to its longest prefix shared with IDS; return the tokens to prefill."""
        common = reuse_prefix(self.cache, self.cached, ids)
        if common is None:  # a cache that cannot be trimmed: start afresh
            self._empty_cache()
            common = 0
        self.cached = ids[:common]
        return ids[common:]

    def send(self, text: str, stats: list[TurnStats] | None = None
             ) -> Iterator[GenerationResponse]:
        """Stream the answer to user message TEXT. The answer (what was generated, even if the
        caller stops early) joins the history when the generator is closed or exhausted."""
        self.messages.append({"role": "user", "content": text})
        ids = encode_messages(self.tokenizer, self.conversation())
        rest = self._reuse(ids)
        turn = TurnStats(len(ids), len(rest))
        if stats is not None:
            stats.append(turn)
        answer, generated = [], []
        try:
            for response in stream_generate(self.model, self.tokenizer, rest,
                                            prompt_cache=self.cache, draft_model=self.draft_model,
                                            **self.options):
                answer.append(response.text)
                generated.append(response.token)
                turn.generation_tokens = response.generation_tokens
                turn.generation_tps = response.generation_tps
                yield response
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            held = self.cache[0].offset
            self.cached = (ids + generated)[:held]

