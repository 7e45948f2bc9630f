"""The fine-tuning loop: mlx-lm's LoRA/DoRA layers and compiled step, our data, packing and
exact resume.

mlx-lm's `trainer.train` is not used as a whole because it cannot restore optimizer state,
step, schedule or data position, and has no attention mask for packed rows; its pieces are
(`grad_checkpoint`, the compiled step with model/optimizer/RNG state, `average_gradients`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from rich.console import Console

from elm_mlx.loading import load
from elm_mlx.lora.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    apply_fine_tune,
    write_adapter_weights,
)
from elm_mlx.lora.checkpoint import (
    check_resumable,
    list_checkpoints,
    load_checkpoint,
    read_state,
    remove_leftovers,
    save_checkpoint,
)
from elm_mlx.lora.config import FinetuneConfig
from elm_mlx.lora.data import (
    Batch,
    BatchStream,
    Encoder,
    batch_stream,
    load_data_dir,
    packed_rows,
)
from elm_mlx.lora.losses import clear_cache, token_losses
from elm_mlx.lora.report import Reporter, prefixed
from elm_spec import ElmError
from elm_spec.chat_template import resolve_chat_template
from elm_spec.outputs import crash_point, output_lock
from elm_spec.progress import make_console
from elm_spec.writes import write_json_atomic, writing

# Settings a resumed run must share with the run it continues.
RESUME_SETTINGS = ("fine_tune_type", "rank", "lora_scale", "dropout", "keys", "iters",
                   "batch_size", "learning_rate", "weight_decay", "lr_schedule", "warmup",
                   "max_seq_length", "grad_accumulation_steps", "seed", "mask_prompt")


def attention_mask(segments: mx.array) -> mx.array:
    """Causal attention that stays inside each packed document: [B, 1, T, T] booleans.

    Padding (segment 0) attends to earlier padding only, so no softmax row is empty. RoPE
    scores depend on relative positions only, so a document packed at offset k scores as it
    would at offset 0 (tested against the documents run one by one).
    """
    length = segments.shape[1]
    positions = mx.arange(length)
    causal = positions[:, None] >= positions[None, :]
    same_document = segments[:, :, None] == segments[:, None, :]
    return mx.expand_dims(same_document & causal, 1)


def loss_terms(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array,
               segments: mx.array | None) -> tuple[mx.array, mx.array]:
    """Per-token weighted cross-entropy of the model and the per-token weights."""
    mask = None if segments is None else attention_mask(segments)
    hidden = model.transformer(inputs, mask=mask)
    return token_losses(model, hidden, targets) * weights, weights


def batch_loss(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array,
               segments: mx.array | None) -> tuple[mx.array, mx.array]:
    """Mean loss over the trained tokens of the batch, and their number."""
    losses, weights = loss_terms(model, inputs, targets, weights, segments)
    tokens = weights.sum()
    return losses.sum() / mx.maximum(tokens, 1), tokens


def batch_arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    segments = None if batch.segments is None else mx.array(batch.segments)
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights), segments


def evaluate(model: nn.Module, stream: BatchStream, num_batches: int,
             clear_cache_threshold: int = 0) -> float:
    """Token-weighted mean loss over the first NUM_BATCHES batches (-1: all)."""
    model.eval()
    count = len(stream) if num_batches < 0 else min(num_batches, len(stream))
    total, tokens = mx.array(0.0), mx.array(0.0)
    for index in range(count):
        loss, n = batch_loss(model, *batch_arrays(stream.batch(index)))
        total, tokens = total + loss * n, tokens + n
        mx.eval(total, tokens)
        clear_cache(clear_cache_threshold)
    return (total / mx.maximum(tokens, 1)).item()


def learning_rate_schedule(config: FinetuneConfig) -> Any:
    """Linear warm-up from 0 (mlx-lm's), then cosine decay to 0 over the remaining optimizer
    updates, or a constant rate."""
    updates = max(config.iters // config.grad_accumulation_steps, 1)
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(config.learning_rate, max(updates - config.warmup, 1))
    else:
        def main(step: mx.array) -> mx.array:
            return mx.full((), config.learning_rate, mx.float32)
    if not config.warmup:
        return main
    warmup = optim.linear_schedule(0.0, config.learning_rate, config.warmup)
    return optim.join_schedules([warmup, main], [config.warmup + 1])


def seed_step(seed: int, step: int) -> None:
    """Dropout's random stream for STEP, a function of (seed, step) so resume replays it."""
    mx.random.seed((seed % 2**31) * 2**32 + step)


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def prepare_output(adapter_path: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, checking that a fresh run would not overwrite adapters."""
    checkpoints = list_checkpoints(adapter_path)
    if resume:
        if not checkpoints:
            raise ElmError(f"{adapter_path}: no checkpoint to resume from")
        return checkpoints[-1]
    if (adapter_path / ADAPTER_WEIGHTS).exists() or checkpoints:
        raise ElmError(f"{adapter_path}: already holds adapters; pass --resume to continue that "
                       "run, or choose another --adapter-path")
    return None


def finetune(config: FinetuneConfig, console: Console | None = None) -> dict[str, float]:
    """Run a fine-tuning job; returns the final validation and test losses that were measured.

    The adapter directory is locked against a second run for the whole job."""
    adapter_path = Path(config.adapter_path)
    with writing(adapter_path), output_lock(adapter_path):
        remove_leftovers(adapter_path)
        return _finetune(config, console or make_console(), adapter_path)


def sequence_length(requested: int | None, context: int, console: Console) -> int:
    """--max-seq-length: the model's context unless given; beyond it, a warning (positions the
    model never trained on, and memory that grows with the square of the length)."""
    if requested is None:
        return context
    if requested > context:
        console.print(f"warning: --max-seq-length {requested} is beyond the model's context of "
                      f"{context} tokens (max_context_length in its config.json): rows that long "
                      "use positions it never trained on, and attention memory grows with the "
                      "square of the length")
    return requested


def check_finite_loss(step: int, loss: float) -> None:
    """Stop before a NaN or infinite loss reaches the adapters (as `elm train` does)."""
    if not math.isfinite(loss):
        raise ElmError(f"step {step}: the training loss is {loss}; stopped without writing this "
                       "step's adapters (check --learning-rate, the model's weights for NaN, and "
                       "that the tokenizer fits the model's vocabulary)")


class Objective(Protocol):
    """What a run trains: its batches, its differentiated loss and its evaluation.

    `loss(model, *arrays)` returns (loss, trained tokens, *the other metrics of `names`, whose
    first is "loss"), each a scalar; `train_arrays(step)` the arrays of 0-based step STEP;
    `settings` what a resumed run must share besides the fine-tuning ones."""

    names: tuple[str, ...]
    settings: dict[str, Any]
    templated: bool  # the data were rendered through the chat template

    @property
    def splits(self) -> Collection[str]: ...

    def loss(self, model: nn.Module, *arrays: mx.array | None) -> tuple[mx.array, ...]: ...

    def train_arrays(self, step: int) -> tuple[mx.array | None, ...]: ...

    def evaluate(self, model: nn.Module, split: str, num_batches: int,
                 clear_cache_threshold: int) -> dict[str, float]: ...


@dataclass
class TokenObjective:
    """Supervised fine-tuning: mean cross-entropy of the trained tokens."""

    streams: dict[str, BatchStream]
    settings: dict[str, Any]
    templated: bool
    names: tuple[str, ...] = ("loss",)

    @property
    def splits(self) -> Collection[str]:
        return self.streams.keys()

    def loss(self, model: nn.Module, *arrays: mx.array | None) -> tuple[mx.array, ...]:
        return batch_loss(model, *arrays)

    def train_arrays(self, step: int) -> tuple[mx.array | None, ...]:
        return batch_arrays(self.streams["train"].training_batch(step))

    def evaluate(self, model: nn.Module, split: str, num_batches: int,
                 clear_cache_threshold: int) -> dict[str, float]:
        loss = evaluate(model, self.streams[split], num_batches, clear_cache_threshold)
        return {"loss": loss, **({"perplexity": math.exp(min(loss, 700.0))} if split == "test" else {})}


def token_objective(config: FinetuneConfig, tokenizer: Any, template: str | None,
                    console: Console) -> TokenObjective:
    """SFT data: the splits read, summarised, packed or not, as batch streams."""
    encoder = Encoder(tokenizer, template, config.mask_prompt)
    splits = load_data_dir(config.data, encoder, config.max_seq_length)
    if config.test and "test" not in splits:
        raise ElmError(f"{config.data}: --test needs a test.jsonl")
    for split in splits.values():
        console.print(split.summary())
    pack = config.pack if config.pack is not None else splits["train"].format == "text"
    if pack:
        rows = len(packed_rows(splits["train"].examples, config.max_seq_length, config.seed))
        if rows < config.batch_size <= len(splits["train"].examples):
            console.print(f"note: packed into rows of {config.max_seq_length} tokens, the training "
                          f"data fills {rows}, fewer than --batch-size {config.batch_size}: "
                          "training unpacked, one example per row")
            pack = False
    streams = {name: batch_stream(split, config.batch_size, config.max_seq_length, pack,
                                  config.seed, training=name == "train")
               for name, split in splits.items()}
    return TokenObjective(streams, {"pack": pack, "train_tokens": splits["train"].num_tokens},
                          templated=any(split.format != "text" for split in splits.values()))


def _finetune(config: FinetuneConfig, console: Console, adapter_path: Path) -> dict[str, float]:
    resume_from = prepare_output(adapter_path, config.resume)

    model, tokenizer = load(config.model)
    config = dataclasses.replace(config, max_seq_length=sequence_length(
        config.max_seq_length, model.spec.max_context_length, console))
    template = resolve_chat_template(config.chat_template, getattr(tokenizer, "chat_template", None))
    objective: Objective
    if config.objective == "sft":
        objective = token_objective(config, tokenizer, template, console)
    else:
        from elm_mlx.lora.preference import preference_objective

        # Before the adapters exist: cached reference log-probabilities are the base model's.
        objective = preference_objective(config, model, tokenizer, template, console)
    pack = objective.settings.get("pack", False)

    mx.random.seed(config.seed)
    num_layers = apply_fine_tune(model, config)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    console.print(f"{config.fine_tune_type} on {num_layers} of {len(model.layers)} blocks: "
                  f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,}); "
                  + (f"packing {'on' if pack else 'off'}" if config.objective == "sft"
                     else f"objective {config.objective}"))

    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(config),
                            weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    settings = {key: getattr(config, key) for key in RESUME_SETTINGS}
    settings.update(num_layers=num_layers, **objective.settings)
    start, trained_tokens = 0, 0
    if resume_from is not None:
        saved = read_state(resume_from)
        check_resumable(resume_from, saved, settings)
        load_checkpoint(resume_from, model, optimizer)
        start, trained_tokens = saved["step"], saved["trained_tokens"]
        console.print(f"resuming from {resume_from} (step {start})")
    adapter_path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(adapter_path / ADAPTER_CONFIG,
                      adapter_config(config, num_layers, template if objective.templated else None))

    if config.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_and_grad = nn.value_and_grad(model, objective.loss)
    accumulation = config.grad_accumulation_steps
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(arrays, previous_grad, update):
        values, grad = loss_and_grad(model, *arrays)
        if previous_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, previous_grad)
        if update:
            grad = average_gradients(grad)
            if accumulation > 1:
                grad = tree_map(lambda g: g / accumulation, grad)
            optimizer.update(model, grad)
            grad = None
        return values, grad

    results: dict[str, float] = {}
    names = objective.names
    with Reporter(adapter_path, config.iters, start, console) as reporter:
        validating = "valid" in objective.splits

        def validate(step: int) -> dict[str, float]:
            tic = time.perf_counter()
            metrics = objective.evaluate(model, "valid", config.val_batches,
                                         config.clear_cache_threshold)
            reporter.validation(step, metrics, time.perf_counter() - tic)
            model.train()
            return metrics

        if validating and start == 0:
            results.update(prefixed("initial_val", validate(0)))
        model.train()
        window, window_tokens, window_steps, elapsed, grad = [0.0] * len(names), 0, 0, 0.0, None
        mx.reset_peak_memory()
        for step in range(start + 1, config.iters + 1):
            tic = time.perf_counter()
            seed_step(config.seed, step)
            values, grad = train_step(objective.train_arrays(step - 1), grad,
                                      step % accumulation == 0)
            mx.eval(state, values, grad)
            clear_cache(config.clear_cache_threshold)
            elapsed += time.perf_counter() - tic
            loss, tokens, *others = (v.item() for v in values)
            check_finite_loss(step, loss)
            window = [w + v for w, v in zip(window, (loss, *others), strict=True)]
            window_tokens += int(tokens)
            window_steps += 1
            trained_tokens += int(tokens)
            reporter.advance()
            if step % config.steps_per_report == 0 or step == config.iters:
                reporter.train(step, {n: w / window_steps for n, w in zip(names, window, strict=True)},
                               optimizer.learning_rate.item(), window_tokens / elapsed,
                               trained_tokens, peak_memory_gb())
                window, window_tokens, window_steps, elapsed = [0.0] * len(names), 0, 0, 0.0
            if validating and (step % config.steps_per_eval == 0 or step == config.iters):
                results.update(prefixed("val", validate(step)))
            if step % config.save_every == 0 or step == config.iters:
                # The checkpoint first: a run killed before the adapters are written resumes
                save_checkpoint(adapter_path, step, model, optimizer,
                                {"trained_tokens": trained_tokens, "settings": settings})
                crash_point("finetune-checkpoint")
                write_adapter_weights(adapter_path, model)
        if not (adapter_path / ADAPTER_WEIGHTS).exists():  # resumed a finished run killed early
            write_adapter_weights(adapter_path, model)
    model.eval()
    if config.test:
        tested = prefixed("test", objective.evaluate(model, "test", config.test_batches,
                                                     config.clear_cache_threshold))
        results.update(tested)
        console.print(", ".join(f"{name.replace('_', ' ')} {value:.4f}"
                                for name, value in tested.items()))
        reporter.record(step=config.iters, **tested)
    console.print(f"adapters written to {adapter_path}")
    return results
