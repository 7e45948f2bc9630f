"""Text generation with the MLX twin: a thin layer over mlx-lm's samplers, KV caches and
`stream_generate` that adds elm's chat-template rule, one-line checks of the sampling flags and,
on the CPU, the sgemv route of elm_mlx.matvec.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from elm_mlx.matvec import matvec_on_cpu
from elm_spec import ElmError
from elm_spec.names import MLX_BITS, MLX_GROUP_SIZES

NO_TEMPLATE_ADVICE = ("this model has no chat template (neither its adapter_config.json nor its "
                      "tokenizer_config.json records one); give one with --chat-template FILE")


def encode_messages(tokenizer: TokenizerWrapper, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the chat template, ready for the assistant turn.

    Rendered and encoded apart, with the template's own special tokens, exactly as `elm
    finetune` renders the prompt part of its chat rows.
    """
    if not tokenizer.has_chat_template:
        raise ElmError(NO_TEMPLATE_ADVICE)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer: TokenizerWrapper, text: str, use_chat_template: bool | None = None,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, as `mlx_lm.generate` encodes them.

    With the chat template (by default whenever the tokenizer has one; `elm_mlx.load` picks
    it) the text is the user turn and the template adds its own special tokens; otherwise the
    text is encoded as is, with the tokenizer's BOS.
    """
    if use_chat_template is None:
        use_chat_template = bool(tokenizer.has_chat_template)
    if use_chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        ids = encode_messages(tokenizer, [*messages, {"role": "user", "content": text}])
    else:
        ids = list(tokenizer.encode(text, add_special_tokens=True))
    if not ids:
        raise ElmError("the prompt is empty")
    return ids


def check_generation_options(*, max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0,
                             top_k: int = 0, min_p: float = 0.0,
                             repetition_penalty: float | None = None,
                             repetition_context_size: int = 20, max_kv_size: int | None = None,
                             prefill_step_size: int = 2048) -> None:
    """One error naming the option (by its flag) that mlx-lm would accept silently or crash on;
    every command that samples (generate, chat, serve) passes through here."""
    def need(condition: bool, flag: str, rule: str, value: object) -> None:
        if not condition:
            raise ElmError(f"{flag} must be {rule}, got {value}")

    for flag, value in (("--temp", temp), ("--top-p", top_p), ("--min-p", min_p),
                        ("--repetition-penalty", repetition_penalty)):
        need(value is None or math.isfinite(value), flag, "a finite number", value)
    need(max_tokens >= 1, "--max-tokens", "at least 1", max_tokens)
    need(temp >= 0, "--temp", "0 (greedy) or more", temp)
    need(0 < top_p <= 1, "--top-p", "in (0, 1]", top_p)
    need(top_k >= 0, "--top-k", "0 (all tokens) or more", top_k)
    need(0 <= min_p <= 1, "--min-p", "in [0, 1]", min_p)
    need(repetition_penalty is None or repetition_penalty > 0, "--repetition-penalty",
         "positive (1: no penalty)", repetition_penalty)
    need(repetition_context_size >= 1, "--repetition-context-size", "at least 1",
         repetition_context_size)
    need(max_kv_size is None or max_kv_size >= 5, "--max-kv-size",
         "at least 5 (4 tokens are kept)", max_kv_size)
    need(prefill_step_size >= 1, "--prefill-step-size", "at least 1", prefill_step_size)


def check_kv_options(kv_bits: int | None, kv_group_size: int = 64,
                     quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
                     head_dim: int | None = None) -> None:
    """One line naming the --kv-* flag MLX's quantization would reject mid-generation."""
    if kv_bits is not None and kv_bits not in MLX_BITS:
        raise ElmError(f"--kv-bits {kv_bits} is not supported; choose from "
                       f"{', '.join(map(str, MLX_BITS))}")
    if kv_group_size not in MLX_GROUP_SIZES:
        raise ElmError(f"--kv-group-size {kv_group_size} is not supported; choose from "
                       f"{', '.join(map(str, MLX_GROUP_SIZES))}")
    if kv_bits is not None and head_dim is not None and head_dim % kv_group_size:
        raise ElmError(f"--kv-group-size {kv_group_size} must divide the model's head_dim "
                       f"{head_dim} (the KV cache is quantized per head)")
    if quantized_kv_start < 0:
        raise ElmError(f"--quantized-kv-start must be 0 or more, got {quantized_kv_start}")


def load_draft(draft_path: str | os.PathLike[str], model_path: str | os.PathLike[str],
               model: nn.Module, tokenizer: TokenizerWrapper) -> nn.Module:
    """The draft model for speculative decoding, refused unless it shares the target's
    vocabulary: the target checks the draft's token ids one for one."""
    from elm_mlx.loading import load

    draft, draft_tokenizer = load(draft_path, chat_template="none")
    differences = []
    if draft.spec.vocab_size != model.spec.vocab_size:
        differences.append(f"{draft.spec.vocab_size} vs {model.spec.vocab_size} embedding rows")
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        differences.append(f"a different tokenizer ({len(draft_tokenizer.get_vocab())} vs "
                           f"{len(tokenizer.get_vocab())} tokens)")
    if differences:
        raise ElmError(f"--draft-model {draft_path} does not share the vocabulary of --model "
                       f"{model_path} ({'; '.join(differences)}); speculative decoding needs "
                       "the same tokenizer")
    return draft


def check_draft_options(num_draft_tokens: int, max_kv_size: int | None = None,
                        repetition_penalty: float | None = None) -> None:
    if num_draft_tokens < 1:
        raise ElmError(f"--num-draft-tokens must be at least 1, got {num_draft_tokens}")
    if max_kv_size is not None:
        raise ElmError("--max-kv-size does not combine with --draft-model (speculative decoding "
                       "rewinds the cache, which a rotating cache cannot)")
    if repetition_penalty is not None:
        raise ElmError("--repetition-penalty does not combine with --draft-model (mlx-lm's "
                       "speculative decoding would penalise only the generated tokens)")


def stream_generate(model: nn.Module, tokenizer: TokenizerWrapper, prompt: str | list[int], *,
                    max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float | None = None,
                    repetition_context_size: int = 20, max_kv_size: int | None = None,
                    seed: int | None = None, prefill_step_size: int = 2048,
                    matvec: bool | None = None, prompt_cache: list[Any] | None = None,
                    draft_model: nn.Module | None = None, num_draft_tokens: int = 3,
                    kv_bits: int | None = None, kv_group_size: int = 64,
                    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
                    ) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s (text segment, token, tokens/s, peak memory) as they come.

    A string prompt is encoded with `encode_prompt`; pass token ids to encode otherwise.
    Sampling follows mlx-lm: `temp` 0 is greedy; `top_p`, `top_k`, `min_p` filter before
    sampling; `repetition_penalty` over the last `repetition_context_size` tokens;
    `max_kv_size` keeps a rotating KV cache of that many tokens. `prompt_cache` (mlx-lm's
    per-layer caches) already holds the tokens before PROMPT and is extended in place;
    `draft_model` decodes speculatively, `num_draft_tokens` at a time (mlx-lm's
    `speculative_generate_step`: the same tokens as without it when greedy); `kv_bits`
    quantizes the KV cache to that many bits (groups of `kv_group_size`) once it holds
    `quantized_kv_start` tokens.
    """
    check_generation_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                             min_p=min_p, repetition_penalty=repetition_penalty,
                             repetition_context_size=repetition_context_size,
                             max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
    check_kv_options(kv_bits, kv_group_size, quantized_kv_start,
                     getattr(getattr(model, "spec", None), "head_dim", None))
    if seed is not None:
        mx.random.seed(seed)
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    sampler = make_sampler(temp, top_p, min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty,
                                        repetition_context_size=repetition_context_size)
    options: dict[str, Any] = {"prompt_cache": prompt_cache, "kv_bits": kv_bits,
                               "kv_group_size": kv_group_size,
                               "quantized_kv_start": quantized_kv_start}
    if draft_model is not None:
        check_draft_options(num_draft_tokens, max_kv_size, repetition_penalty)
        options.update(draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    else:
        options["max_kv_size"] = max_kv_size
    with contextlib.ExitStack() as stack:
        for each in (model, draft_model):
            if each is not None:
                stack.enter_context(matvec_on_cpu(each, matvec))
        yield from mlx_lm_stream_generate(
            model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler,
            logits_processors=processors, prefill_step_size=prefill_step_size, **options)


def generate(model: nn.Module, tokenizer: TokenizerWrapper, prompt: str | list[int],
             **options: Any) -> str:
    """The whole continuation as one string; `options` are those of `stream_generate`."""
    return "".join(response.text for response in stream_generate(model, tokenizer, prompt, **options))
