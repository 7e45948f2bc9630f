"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, validated by pydantic.

Only what elm implements is accepted with a meaning; other OpenAI fields that change nothing
for a local model (`user`, `frequency_penalty` 0, ...) are ignored, and fields that would
change the answer in ways elm cannot honour (`n` > 1, tools) are refused with a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    adapter: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    min_p: Number = Field(0.0, ge=0, le=1)
    seed: StrictInt | None = None
    repetition_penalty: Number | None = Field(None, gt=0)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    response_format: dict[str, Any] | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise ValueError("stop: at most 4 sequences")
        return [s for s in stops if s]


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictInt]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: None = None
