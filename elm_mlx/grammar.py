"""Structured output: OpenAI `response_format` enforced while decoding, with llguidance.

A `JsonConstraint` is a logits processor in mlx-lm's sense (`processor(tokens, logits)`): before
each sampling step it lets the grammar matcher advance over the token just chosen, asks it for
the set of tokens that keep the output inside the JSON schema, and sets every other logit to
-inf. Once the value is complete only EOS remains allowed, so the output always parses.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from elm_spec import ElmError

_TOKENIZERS: dict[int, Any] = {}


def _ll_tokenizer(tokenizer: TokenizerWrapper, vocab_size: int) -> Any:
    """llguidance's view of TOKENIZER (built once per tokenizer: it takes about a second)."""
    import llguidance.hf

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(
            tokenizer._tokenizer, n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)[0])
    return _TOKENIZERS[key]


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for; None for plain text."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ElmError("response_format.json_schema must be an object with a 'schema' object")
        return spec.get("schema", {})
    raise ElmError(f"response_format.type {kind!r}: choose text, json_object or json_schema")


def compile_schema(schema: dict[str, Any]) -> str:
    """The llguidance grammar of SCHEMA (compact JSON: no free whitespace); ElmError if the
    schema is not one llguidance supports."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as error:
        raise ElmError(f"response_format: unsupported JSON schema ({error})") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ElmError(f"response_format: unsupported JSON schema ({'; '.join(messages)})")
    return grammar


class JsonConstraint:
    """Masks logits to the tokens the grammar allows next (see the module doc)."""

    def __init__(self, grammar: str, tokenizer: TokenizerWrapper, vocab_size: int):
        import llguidance
        import llguidance.numpy

        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._vocab_size = vocab_size
        self._steps = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._steps > 0:  # the last context token is the one sampled after the previous call
            self._matcher.consume_token(int(tokens[-1].item()))
        self._steps += 1
        self._fill(self._matcher, self._bitmask, 0)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self._vocab_size]
        allowed = mx.array(bits.astype(bool))
        return mx.where(allowed, logits, -mx.inf)
