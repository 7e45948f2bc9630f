"""The generation engine behind `elm serve`: continuous batching on mlx-lm's `BatchGenerator`.

One thread owns the models and runs every decoding step; requests arrive from any thread
through `Engine.submit` and their results leave through a per-request callback. Requests for
the same model (base or one of its adapters) decode together in one batch; each has its own
sampler, logits processors (repetition penalty, a grammar) and stop strings. Prompts that share
a prefix with an earlier request start from that request's KV cache (mlx-lm's
`LRUPromptCache`), so only the new tokens are prefilled.

With a draft model (speculative decoding) or a quantized KV cache the engine decodes one
request at a time, as `mlx_lm.server` does: mlx-lm's `BatchGenerator` has neither.

A prompt cache file (`elm serve --prompt-cache-file`, made by `elm generate
--save-prompt-cache`) is kept beside the shared cache for the whole run: every request whose
prompt begins as the file's does starts from it, however many other prompts have come since.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    BatchGenerator,
    StopSequences,
    generate_step,
    speculative_generate_step,
)
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper

from elm_mlx import prompt_cache as cache_files
from elm_mlx.loading import load, load_adapters, load_model, read_tokenizer, set_chat_template
from elm_mlx.matvec import matvec_on_cpu
from elm_spec import ElmError
from elm_spec.chat_template import chat_template_for
from elm_spec.hub import resolve

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


# Requests that arrive within this many seconds of each other join one prefill: a prefill
# pass over the weights costs about as much for several prompts as for one.
ADMIT_WINDOW_S = 0.01


class EngineBusy(Exception):
    """Raised by `Engine.submit` when the queue is full."""


@dataclass
class Sampling:
    """Per-request sampling, in mlx-lm's terms (temp 0: greedy)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int = 20

    def sampler(self) -> Sampler:
        if self.seed is None or self.temp == 0:
            return make_sampler(self.temp, self.top_p, self.min_p, top_k=self.top_k)
        return seeded_sampler(self, self.seed)

    def processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(repetition_penalty=self.repetition_penalty,
                                      repetition_context_size=self.repetition_context_size)


def seeded_sampler(sampling: Sampling, seed: int) -> Sampler:
    """mlx-lm's filters (top-p, min-p, top-k, in make_sampler's order) and a categorical draw
    from the request's own key, so a seeded request samples the same tokens whatever else is in
    its batch (make_sampler draws from MLX's global random state)."""
    filters = []
    if 0 < sampling.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, sampling.top_p))
    if sampling.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, sampling.min_p))
    if sampling.top_k > 0:
        filters.append(lambda x: apply_top_k(x, sampling.top_k))
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * (1.0 / sampling.temp), key=step_key)

    return sample


@dataclass
class Request:
    """One completion: prompt token ids and how to continue them."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    top_logprobs: int = 0
    model: str | None = None  # a name given to Engine; None: the first
    processors: Sequence[LogitsProcessor] = ()  # e.g. a grammar, after the sampling ones


@dataclass
class Event:
    """A piece of output: TEXT (possibly empty while a stop string may be starting), the token
    and its log-probability, the top alternatives, and FINISH_REASON on the last event."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


class StopMatcher:
    """Holds back text that may be the start of a stop string, across token boundaries."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed)."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
        if hits:
            position = min(hits)[0]
            out, self.pending = self.pending[:position], ""
            return out, True
        hold = max((k for s in self.stop for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Ticket:
    """What `Engine.submit` returns: cancel() stops the request's work (its client went away)."""

    def __init__(self, request: Request, emit: Callable[[Event], None]):
        self.request = request
        self.emit = emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Active:
    ticket: Ticket
    detokenizer: Any
    stops: StopMatcher
    prompt_tokens: int
    cached_tokens: int


@dataclass
class ServedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    parent: str | None = None  # for adapters: the name of the base model they are applied to


def load_served_models(model_dir: str | os.PathLike[str],
                       adapter_paths: Sequence[str | os.PathLike[str]] = (),
                       chat_template: str | None = None) -> dict[str, ServedModel]:
    """The base model under its directory's name and one model per adapter directory (named
    after it, first: the default), all sharing the base weights. Each tokenizer carries the
    chat template `elm_spec.chat_template` picks for its adapters."""
    base, tokenizer = load(model_dir, chat_template=chat_template)
    base_name = Path(model_dir).name
    served = {}
    for adapter_path in adapter_paths:
        name = Path(adapter_path).name
        if name in served or name == base_name:
            raise ElmError(f"--adapter-path {adapter_path}: another served model is named {name!r}")
        model = load_model(model_dir, lazy=True)
        model.update(base.parameters())  # shared arrays: the base weights are held once
        load_adapters(model, adapter_path)
        mx.eval(model.parameters())  # on this thread: MLX streams are per thread
        adapted = read_tokenizer(Path(model_dir), model.spec.eos_token_id)
        set_chat_template(adapted, chat_template_for(model_dir, adapter_path, chat_template))
        served[name] = ServedModel(model, adapted, parent=base_name)
    served[base_name] = ServedModel(base, tokenizer)
    return served


@dataclass
class SavedPrefix:
    """A prompt cache file's KV cache and the tokens it holds, for one served model."""

    model: str
    tokens: list[int]
    cache: list[Any]


def load_saved_prefix(path: str | os.PathLike[str], models: dict[str, ServedModel],
                      model_dir: str | os.PathLike[str],
                      adapter_paths: Sequence[str | os.PathLike[str]] = (),
                      kv_bits: int | None = None, kv_group_size: int = 64) -> SavedPrefix:
    """The cache in PATH (elm's format) and the served model it was made for: the base model
    or one of its adapters, as named by `load_served_models`."""
    local_dir = resolve(model_dir)
    candidates = [(Path(a).name, resolve(a)) for a in adapter_paths]
    candidates.append((Path(model_dir).name, None))
    first_error: ElmError | None = None
    for name, adapter_dir in candidates:
        try:
            saved = cache_files.load(path, models[name].model, model_dir, local_dir, adapter_dir,
                                     kv_bits, kv_group_size)
        except ElmError as error:
            first_error = first_error or error
            continue
        tokens = cache_files.held_tokens(saved)
        if kv_bits is None and any(hasattr(layer, "bits") for layer in saved.cache):
            raise ElmError(f"--prompt-cache-file {path}: its KV cache is quantized to "
                           f"{saved.cache[0].bits} bits; serve it with --kv-bits "
                           f"{saved.cache[0].bits}")
        mx.eval([layer.state for layer in saved.cache])  # on this thread: streams are per thread
        return SavedPrefix(name, tokens, saved.cache)
    assert first_error is not None
    raise first_error


@dataclass
class Speedups:
    """Speculative decoding and KV cache quantization (either one: one request at a time)."""

    draft_model: nn.Module | None = None
    num_draft_tokens: int = 3
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START

    @property
    def batchable(self) -> bool:
        return self.draft_model is None and self.kv_bits is None


class Engine:
    """Continuous batching over MODELS (name -> model and tokenizer), run on its own thread."""

    def __init__(self, models: dict[str, ServedModel], max_batch: int = 8, max_queue: int = 16,
                 prompt_cache_size: int = 10, prefill_step_size: int = 2048,
                 speedups: Speedups | None = None, saved_prefix: SavedPrefix | None = None):
        if not models:
            raise ValueError("no models to serve")
        self.models = models
        self.default_model = next(iter(models))
        self.speedups = speedups or Speedups()
        if self.speedups.draft_model is not None and self.speedups.kv_bits is not None:
            # mlx-lm's speculative decoding quantizes copies of the cache it is given, so the
            # cache kept for later requests would not hold what it claims
            raise ElmError("--kv-bits does not combine with --draft-model in elm serve")
        max_batch = max_batch if self.speedups.batchable else 1
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = LRUPromptCache(prompt_cache_size)
        self.saved_prefix = saved_prefix
        self._inbox: queue.Queue[Ticket] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._uids = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elm-engine", daemon=True)
        self.failure: str | None = None

    # --- the caller's side -------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Ticket:
        """Queue REQUEST; EMIT receives its events (on the engine thread). Raises EngineBusy
        when max_batch requests decode and max_queue more wait."""
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise EngineBusy
            self._in_flight += 1
        ticket = Ticket(request, emit)
        self._inbox.put(ticket)
        return ticket

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # --- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        generators: dict[str, BatchGenerator] = {}
        active: dict[tuple[str, int], _Active] = {}
        try:
            with contextlib.ExitStack() as stack:
                for served in self.models.values():
                    stack.enter_context(matvec_on_cpu(served.model))
                if self.speedups.draft_model is not None:
                    stack.enter_context(matvec_on_cpu(self.speedups.draft_model))
                while not self._stop.is_set():
                    if not self.speedups.batchable:
                        self._serve_alone(active)
                        continue
                    self._admit(generators, active, block=not active)
                    self._drop_cancelled(generators, active)
                    for name, generator in generators.items():
                        if any(key[0] == name for key in active):
                            self._step(name, generator, active)
        except Exception as error:  # a dead engine must answer, not hang its clients
            self.failure = f"{type(error).__name__}: {error}"
            for entry in active.values():
                entry.ticket.emit(Event("", finish_reason="error", error=self.failure))
            raise

    def _admit(self, generators: dict[str, BatchGenerator], active: dict[tuple[str, int], _Active],
               block: bool) -> None:
        """Insert the waiting requests into their batches; once one has come, wait for others
        arriving just after it, so that their prompts are prefilled together, not one by one."""
        for admitted in range(self.max_batch):
            try:
                if admitted:
                    ticket = self._inbox.get(timeout=ADMIT_WINDOW_S)
                else:
                    ticket = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            if ticket.cancelled:
                self._done()
                continue
            request = ticket.request
            name = request.model or self.default_model
            served = self.models[name]
            eos = [[token] for token in sorted(served.tokenizer.eos_token_ids)]
            generator = generators.get(name)
            if generator is None:
                generator = generators[name] = BatchGenerator(
                    served.model, stop_tokens=eos, completion_batch_size=self.max_batch,
                    prefill_batch_size=self.max_batch, prefill_step_size=self.prefill_step_size)
            cache, rest = self._nearest_cache(name, request.prompt)
            cached = len(request.prompt) - len(rest)
            (uid,) = generator.insert(
                [rest], max_tokens=[request.max_tokens], caches=[cache],
                all_tokens=[request.prompt[:cached]], samplers=[request.sampling.sampler()],
                logits_processors=[[*request.sampling.processors(), *request.processors]],
                stop_sequences=[StopSequences(eos)])
            active[(name, uid)] = _Active(ticket, served.tokenizer.detokenizer,
                                          StopMatcher(request.stop), len(request.prompt), cached)

    def _nearest_cache(self, name: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the KV cache holding the longest prefix of PROMPT that the shared cache or
        the saved prefix has (None: no prefix), and the tokens left to prefill (at least one:
        the last token's logits are the first step's)."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(name, prompt)
        saved = self.saved_prefix
        if saved is not None and saved.model == name and \
                cache_files.shared_prefix_length(saved.tokens, prompt) > len(prompt) - len(rest):
            candidate = copy.deepcopy(saved.cache)
            kept = cache_files.reuse_prefix(candidate, saved.tokens, prompt)
            if kept is not None and kept > len(prompt) - len(rest):
                cache, rest = candidate, prompt[kept:]
        if cache is not None and not rest:  # an exact hit: recompute the last token's logits
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _drop_cancelled(self, generators: dict[str, BatchGenerator],
                        active: dict[tuple[str, int], _Active]) -> None:
        for name, uid in [key for key, entry in active.items() if entry.ticket.cancelled]:
            generators[name].remove([uid])
            del active[(name, uid)]
            self._done()

    def _step(self, name: str, generator: BatchGenerator, active: dict[tuple[str, int], _Active]
              ) -> None:
        for response in generator.next_generated():
            entry = active.get((name, response.uid))
            if entry is None:
                continue
            finish = _emit(entry, response.token, response.logprobs, response.finish_reason)
            if finish is None:
                continue
            del active[(name, response.uid)]
            if response.finish_reason is None:  # a stop string: the sequence is still in the batch
                generator.remove([response.uid])
            elif response.prompt_cache is not None:
                self.prompt_cache.insert_cache(name, list(response.all_tokens),
                                               response.prompt_cache)
            self._done()


    def _serve_alone(self, active: dict[tuple[str, int], _Active]) -> None:
        """The next request on its own, through mlx-lm's (speculative) generation step; its
        cache is kept for prompts that share its prefix, like a batched request's."""
        try:
            ticket = self._inbox.get(timeout=0.05)
        except queue.Empty:
            return
        request = ticket.request
        name = request.model or self.default_model
        served, speedups = self.models[name], self.speedups
        try:
            if ticket.cancelled:
                return
            cache, rest = self._nearest_cache(name, request.prompt)
            if cache is None:
                cache = make_prompt_cache(served.model)
                if speedups.draft_model is not None:
                    cache += make_prompt_cache(speedups.draft_model)
            entry = active[(name, -1)] = _Active(
                ticket, served.tokenizer.detokenizer, StopMatcher(request.stop),
                len(request.prompt), len(request.prompt) - len(rest))
            options: dict[str, Any] = dict(
                max_tokens=request.max_tokens, sampler=request.sampling.sampler(),
                logits_processors=[*request.sampling.processors(), *request.processors],
                prompt_cache=cache, prefill_step_size=self.prefill_step_size,
                kv_bits=speedups.kv_bits, kv_group_size=speedups.kv_group_size,
                quantized_kv_start=speedups.quantized_kv_start)
            if speedups.draft_model is None:
                steps = generate_step(mx.array(rest), served.model, **options)
            else:
                steps = speculative_generate_step(
                    mx.array(rest), served.model, speedups.draft_model,
                    num_draft_tokens=speedups.num_draft_tokens, **options)
            generated: list[int] = []
            for step in steps:
                if ticket.cancelled:
                    break
                token, logprobs = int(step[0]), step[1]
                generated.append(token)
                finish = "stop" if token in served.tokenizer.eos_token_ids else (
                    "length" if len(generated) == request.max_tokens else None)
                if _emit(entry, token, logprobs, finish) is not None:
                    break
            steps.close()  # speculative decoding rewinds the cache to what it accepted
            del active[(name, -1)]
            kept = min(layer.offset for layer in cache)  # the draft's may run one token apart
            for layer in cache:
                layer.trim(layer.offset - kept)
            self.prompt_cache.insert_cache(name, (request.prompt + generated)[:kept], cache)
        finally:
            self._done()


def _emit(entry: _Active, token: int, logprobs: mx.array, finish: str | None) -> str | None:
    """Send ENTRY's client the event for TOKEN; the finish reason (a completed stop string
    gives "stop"), or None while the request goes on."""
    if finish != "stop":  # the EOS token itself is not text
        entry.detokenizer.add_token(token)
    if finish is not None:
        entry.detokenizer.finalize()
    text, stopped = entry.stops.feed(entry.detokenizer.last_segment)
    if stopped:
        finish = "stop"
    elif finish is not None:
        text += entry.stops.flush()
    entry.ticket.emit(Event(text, token, logprobs[token].item(),
                            _top(logprobs, entry.ticket.request.top_logprobs), finish,
                            entry.prompt_tokens, entry.cached_tokens))
    return finish


def _top(logprobs: mx.array, count: int) -> list[tuple[int, float]]:
    if count <= 0:
        return []
    indices = mx.argpartition(-logprobs, count - 1)[:count]
    values = logprobs[indices]
    order = mx.argsort(-values)
    return list(zip(indices[order].tolist(), values[order].tolist(), strict=True))

