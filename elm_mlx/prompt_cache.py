"""Prompt cache files: a KV cache saved to disk, so that a later run prefills only what follows.

The format is mlx-lm's (`mlx_lm.models.cache.save_prompt_cache`: one safetensors file holding
each layer's cache and string metadata), so `mlx_lm.generate --prompt-cache-file` reads what elm
writes and elm reads what `mlx_lm.cache_prompt` writes. mlx-lm records the model as it was
named (`model`) and the tokenizer settings (`tokenizer_config`); elm adds the prompt text and
the tokens the cache holds, and a fingerprint of the model directory and adapters, so a cache
is reused only for the model it was computed with and only as far as the new prompt agrees.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import (
    QuantizedKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper

from elm_mlx.generate import encode_prompt
from elm_spec import ElmError
from elm_spec.writes import atomic_path

FINGERPRINT = "elm_model_fingerprint"
PROMPT = "elm_prompt"
TOKENS = "elm_tokens"
SUFFIX = ".safetensors"
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def _file_digest(digest: Any, path: Path) -> None:
    """Size, safetensors header and evenly spaced samples of the data: distinct models differ
    there, and reading a few MB keeps this instant for a multi-GB model."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        header = handle.read(8)
        digest.update(header + handle.read(int.from_bytes(header, "little") if len(header) == 8 else 0))
        for index in range(_SAMPLES):
            handle.seek(size * index // _SAMPLES)
            digest.update(handle.read(_SAMPLE_BYTES))


def model_fingerprint(model_dir: str | os.PathLike[str],
                      adapter_path: str | os.PathLike[str] | None = None) -> str:
    """What the KV values depend on: config.json, the weights and the adapters (if any)."""
    # not the tokenizer: the cache holds token ids, whose KV values it does not change
    files = [Path(model_dir) / "config.json", *sorted(Path(model_dir).glob("model*.safetensors"))]
    if adapter_path is not None:  # not the checkpoints that training leaves beside them
        files += [Path(adapter_path) / "adapter_config.json",
                  Path(adapter_path) / "adapters.safetensors"]
    digest = hashlib.sha256()
    for path in files:
        if path.suffix == ".json":
            digest.update(path.name.encode() + path.read_bytes())
        else:
            _file_digest(digest, path)
    return digest.hexdigest()


@dataclass
class SavedPromptCache:
    path: Path
    cache: list[Any]
    prompt: str | None  # elm's: the prompt text it was made from; mlx-lm's: unknown
    tokens: list[int] | None  # the tokens it holds (None for mlx-lm's: an unknown prefix)


def check_file_name(path: str | os.PathLike[str], flag: str) -> Path:
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ElmError(f"{flag} {path}: the file name must end in {SUFFIX} (mlx-lm's prompt "
                       "cache format)")
    return path


def save(path: str | os.PathLike[str], cache: list[Any], prompt: str, tokens: list[int],
         model_name: str | os.PathLike[str], model_dir: str | os.PathLike[str],
         adapter_path: str | os.PathLike[str] | None = None) -> None:
    """Write CACHE (holding TOKENS, the encoding of PROMPT) to PATH, replacing it at once."""
    path = check_file_name(path, "--save-prompt-cache")
    metadata = {"model": str(model_name), "tokenizer_config": "{}", PROMPT: prompt,
                TOKENS: json.dumps(tokens), FINGERPRINT: model_fingerprint(model_dir, adapter_path)}
    with atomic_path(path, SUFFIX) as temporary:
        save_prompt_cache(str(temporary), cache, metadata)


def load(path: str | os.PathLike[str], model: nn.Module, model_name: str | os.PathLike[str],
         model_dir: str | os.PathLike[str], adapter_path: str | os.PathLike[str] | None = None,
         kv_bits: int | None = None, kv_group_size: int = 64) -> SavedPromptCache:
    """The cache in PATH, refused in one line unless it was made for this model (and adapters)
    with KV settings that agree with KV_BITS and KV_GROUP_SIZE."""
    path = check_file_name(path, "--prompt-cache-file")
    if not path.is_file():
        raise ElmError(f"--prompt-cache-file {path}: no such file")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as error:  # mlx's loader, tree_unflatten or a cache class's from_state
        raise ElmError(f"{path}: not a prompt cache file ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''})") from None
    other_model = f"{path}: the prompt cache was made for another model than --model {model_name}"
    if FINGERPRINT in metadata:
        if metadata[FINGERPRINT] != model_fingerprint(model_dir, adapter_path):
            raise ElmError(f"{other_model} (or other adapters: {metadata.get('model')!r} then)")
    elif not _same_model(metadata.get("model"), model_name, model_dir):
        raise ElmError(f"{other_model} ({metadata.get('model')!r})")
    if len(cache) != len(model.layers) or any(
            getattr(entry, "offset", 0) and _kv_heads(entry) != heads
            for entry, heads in zip(cache, model.spec.num_kv_heads, strict=False)):
        raise ElmError(f"{other_model} (its layers do not match)")
    if isinstance(cache[0], QuantizedKVCache):
        if kv_bits is not None and kv_bits != cache[0].bits:
            raise ElmError(f"--kv-bits {kv_bits} does not match {path}, quantized to "
                           f"{cache[0].bits} bits")
        if kv_group_size != cache[0].group_size:
            raise ElmError(f"--kv-group-size {kv_group_size} does not match {path}, quantized in "
                           f"groups of {cache[0].group_size}")
    tokens = json.loads(metadata[TOKENS]) if TOKENS in metadata else None
    return SavedPromptCache(path, cache, metadata.get(PROMPT), tokens)


def held_tokens(saved: SavedPromptCache) -> list[int]:
    """The tokens SAVED holds, which only elm's files record."""
    if saved.tokens is None:
        raise ElmError(f"--prompt-cache-file {saved.path}: made by mlx_lm.cache_prompt, it does "
                       "not record the tokens it holds; make one with elm generate "
                       "--save-prompt-cache")
    return saved.tokens


def _same_model(recorded: str | None, model_name: str | os.PathLike[str],
                model_dir: str | os.PathLike[str]) -> bool:
    """mlx-lm records the model as its user named it: a path (compared once resolved) or a
    Hub repo id."""
    if recorded is None:
        return False
    if recorded == str(model_name):
        return True
    return Path(recorded).is_dir() and Path(recorded).resolve() == Path(model_dir).resolve()


def _kv_heads(entry: Any) -> int:
    keys = entry.keys[0] if isinstance(entry.keys, (tuple, list)) else entry.keys
    return keys.shape[1]


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens A and B have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def reuse_prefix(cache: list[Any], cached: list[int], ids: list[int]) -> int | None:
    """Trim CACHE, which holds the tokens CACHED, to its longest prefix shared with IDS (leaving
    IDS' last token to be fed, for its logits); the number of tokens kept, or None when the cache
    would need trimming and cannot be trimmed."""
    common = min(shared_prefix_length(cached, ids), len(ids) - 1)
    if common < len(cached):
        if not can_trim_prompt_cache(cache):
            return None
        trim_prompt_cache(cache, len(cached) - common)
    return common


def encode_continuation(tokenizer: TokenizerWrapper, text: str, use_chat_template: bool | None,
                        system_prompt: str | None = None) -> list[int]:
    """The tokens of TEXT continuing a cache made by `mlx_lm.cache_prompt`, which holds the user
    turn as the chat template opens it (or the raw text), as `mlx_lm.generate` encodes them:
    from the user's text to the template's generation prompt. Without a template elm adds no
    BOS token here (mlx-lm adds one in the middle of the sequence)."""
    if use_chat_template is None:
        use_chat_template = bool(tokenizer.has_chat_template)
    if use_chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        rendered = [tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": content}], tokenize=False,
            add_generation_prompt=True) for content in (text, "<query>")]
        text = rendered[0][rendered[1].index("<query>"):]
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ElmError("the prompt is empty")
    return ids


@dataclass
class Prompt:
    """A prompt ready for `stream_generate`: the whole prompt's TEXT and IDS (None after an
    mlx-lm cache, whose tokens are unknown), the ids to prefill and the cache they extend."""

    text: str
    ids: list[int] | None
    rest: list[int]
    cache: list[Any] | None

    @property
    def cached(self) -> int:
        return 0 if self.cache is None or self.ids is None else len(self.ids) - len(self.rest)


def prepare_prompt(model: nn.Module, tokenizer: TokenizerWrapper, text: str,
                   use_chat_template: bool | None = None, system_prompt: str | None = None,
                   saved: SavedPromptCache | None = None, keep: bool = False) -> Prompt:
    """TEXT as a prompt: after SAVED's prompt (only what differs from the tokens SAVED holds is
    prefilled) or on its own, with a fresh cache to KEEP (save) afterwards."""
    if saved is not None and saved.tokens is None:
        if keep:
            raise ElmError(f"--save-prompt-cache cannot extend {saved.path}: made by "
                           "mlx_lm.cache_prompt, it does not record the tokens it holds")
        rest = encode_continuation(tokenizer, text, use_chat_template, system_prompt)
        return Prompt(text, None, rest, saved.cache)
    if saved is None:
        ids = encode_prompt(tokenizer, text, use_chat_template, system_prompt)
        return Prompt(text, ids, ids, make_prompt_cache(model) if keep else None)
    text = (saved.prompt or "") + text
    ids = encode_prompt(tokenizer, text, use_chat_template, system_prompt)
    common = reuse_prefix(saved.cache, saved.tokens, ids)
    if common is None:
        raise ElmError(f"{saved.path}: the prompt departs from the cached one and this cache "
                       "cannot be trimmed")
    return Prompt(text, ids, ids[common:], saved.cache)


def keep_prompt(path: str | os.PathLike[str], prompt: Prompt, model_name: str | os.PathLike[str],
                model_dir: str | os.PathLike[str],
                adapter_path: str | os.PathLike[str] | None = None) -> None:
    """Save PROMPT's cache, trimmed back to the prompt (generation extended it), to PATH."""
    assert prompt.cache is not None and prompt.ids is not None
    extra = prompt.cache[0].offset - len(prompt.ids)
    if extra > 0:
        trim_prompt_cache(prompt.cache, extra)
    save(path, prompt.cache, prompt.text, prompt.ids[:prompt.cache[0].offset], model_name,
         model_dir, adapter_path)
