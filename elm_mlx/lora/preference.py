"""Preference tuning on the MLX twin: DPO (sigmoid, label smoothing, IPO) and ORPO.

DPO compares the policy's log-probability of each answer with a reference model's. The
reference is the base model itself with the adapters switched off for its forward pass (no
second copy in memory), or `--ref-model`; with `--cache-ref-logps` (and always for full
fine-tuning without `--ref-model`, which leaves no base to switch back to) its log-probabilities
are computed once, before training, for every pair. ORPO needs no reference.

Per answer, `logp` is the sum of its tokens' log-probabilities (IPO and ORPO use the mean):

    DPO   h = (logp_c - logp_r) - (ref_c - ref_r)
          loss = -(1 - eps) log s(beta h) - eps log s(-beta h)        (eps: --label-smoothing)
    IPO   loss = (h - 1 / (2 beta))^2
    ORPO  loss = NLL(chosen) - beta log s(log odds(chosen) - log odds(rejected)),
          odds = p / (1 - p) of the mean token log-probability p

Rewards are beta (logp - ref) for DPO and IPO, beta logp for ORPO; the margin is chosen minus
rejected, and the accuracy the share of pairs whose chosen reward is higher (a tie counts half).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from rich.console import Console

from elm_mlx.loading import load_model
from elm_mlx.lora.config import FinetuneConfig
from elm_mlx.lora.data import Encoder
from elm_mlx.lora.losses import clear_cache, token_losses
from elm_spec import ElmError
from elm_spec.preference import (
    PreferenceBatch,
    PreferenceStream,
    load_preference_dir,
    preference_stream,
)

METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def answer_logps(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array
                 ) -> tuple[mx.array, mx.array]:
    """Each row's summed answer log-probability and its number of answer tokens: [2B], [2B]."""
    hidden = model.transformer(inputs)
    return -(token_losses(model, hidden, targets) * weights).sum(axis=-1), weights.sum(axis=-1)


def reward_metrics(chosen: mx.array, rejected: mx.array) -> tuple[mx.array, ...]:
    margin = chosen - rejected
    accuracy = (margin > 0).astype(mx.float32) + 0.5 * (margin == 0).astype(mx.float32)
    return chosen.mean(), rejected.mean(), margin.mean(), accuracy.mean()


def dpo_loss(policy_chosen: mx.array, policy_rejected: mx.array, ref_chosen: mx.array,
             ref_rejected: mx.array, beta: float, label_smoothing: float, ipo: bool
             ) -> tuple[mx.array, ...]:
    """(mean loss, *reward metrics) of the pairs; for IPO the log-probabilities are means."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - label_smoothing) * nn.log_sigmoid(beta * h)
                  - label_smoothing * nn.log_sigmoid(-beta * h))
    rewards = (mx.stop_gradient(beta * (policy_chosen - ref_chosen)),
               mx.stop_gradient(beta * (policy_rejected - ref_rejected)))
    return (losses.mean(), *reward_metrics(*rewards))


def orpo_loss(chosen: mx.array, rejected: mx.array, chosen_tokens: mx.array,
              rejected_tokens: mx.array, beta: float) -> tuple[mx.array, ...]:
    """(loss, *reward metrics) from summed answer log-probabilities and their token counts."""
    chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
    log_odds = ((chosen_mean - rejected_mean)
                - (mx.log1p(-mx.exp(chosen_mean)) - mx.log1p(-mx.exp(rejected_mean))))
    nll = -chosen.sum() / chosen_tokens.sum()
    rewards = mx.stop_gradient(beta * chosen_mean), mx.stop_gradient(beta * rejected_mean)
    return (nll - beta * nn.log_sigmoid(log_odds).mean(), *reward_metrics(*rewards))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model: each LoRA/DoRA layer replaced by the layer it adapts, then put back."""
    adapted = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (LoRALinear, DoRALinear))]
    model.update_modules(tree_unflatten([(name, module.linear) for name, module in adapted]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(adapted))


@dataclass
class Reference:
    """Reference log-probabilities of batches: cached per split, or computed with REF_MODEL
    (None: the policy with its adapters disabled)."""

    ref_model: nn.Module | None
    mean: bool  # per-token means (IPO) instead of sums
    cache: dict[str, np.ndarray] = field(default_factory=dict)  # split -> [pairs, 2]

    def _compute(self, model: nn.Module, batch: PreferenceBatch) -> tuple[mx.array, mx.array]:
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights))
        if self.ref_model is not None:
            logps, tokens = answer_logps(self.ref_model, *arrays)
        else:
            with adapters_disabled(model):
                logps, tokens = answer_logps(model, *arrays)
        logps = mx.stop_gradient(logps / tokens if self.mean else logps)
        mx.eval(logps)
        half = batch.num_pairs
        return logps[:half], logps[half:]

    def fill(self, model: nn.Module, split: str, stream: PreferenceStream,
             clear_cache_threshold: int) -> None:
        """Compute and keep the reference log-probabilities of every pair of STREAM."""
        table = np.zeros((len(stream.pairs), 2), np.float32)
        for index in range(len(stream)):
            batch = stream.batch(index)
            chosen, rejected = self._compute(model, batch)
            table[batch.indices] = np.stack([np.array(chosen), np.array(rejected)], axis=1)
            clear_cache(clear_cache_threshold)
        self.cache[split] = table

    def logps(self, model: nn.Module, split: str, batch: PreferenceBatch
              ) -> tuple[mx.array, mx.array]:
        if split in self.cache:
            rows = self.cache[split][batch.indices]
            return mx.array(rows[:, 0]), mx.array(rows[:, 1])
        return self._compute(model, batch)


@dataclass
class PreferenceObjective:
    """DPO, IPO or ORPO over preference batches (elm_mlx.lora.train.Objective)."""

    config: FinetuneConfig
    streams: dict[str, PreferenceStream]  # training: remainder dropped
    eval_streams: dict[str, PreferenceStream]  # every pair
    reference: Reference | None  # None for ORPO
    model: nn.Module
    settings: dict[str, Any]
    names: tuple[str, ...] = METRICS
    templated: bool = True

    @property
    def splits(self) -> Collection[str]:
        return self.eval_streams.keys()

    def loss(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, ...]:
        """(loss, scored tokens, *reward metrics)."""
        inputs, targets, weights, *ref = arrays
        logps, tokens = answer_logps(model, inputs, targets, weights)
        half = logps.shape[0] // 2
        if self.reference is None:
            values = orpo_loss(logps[:half], logps[half:], tokens[:half], tokens[half:],
                               self.config.beta)
        else:
            if self.config.ipo:
                logps = logps / tokens
            values = dpo_loss(logps[:half], logps[half:], *ref, self.config.beta,
                              self.config.label_smoothing, self.config.ipo)
        return values[0], tokens.sum(), *values[1:]

    def arrays(self, split: str, batch: PreferenceBatch) -> tuple[mx.array, ...]:
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights))
        if self.reference is None:
            return arrays
        return (*arrays, *self.reference.logps(self.model, split, batch))

    def train_arrays(self, step: int) -> tuple[mx.array, ...]:
        return self.arrays("train", self.streams["train"].training_batch(step))

    def evaluate(self, model: nn.Module, split: str, num_batches: int,
                 clear_cache_threshold: int) -> dict[str, float]:
        """Pair-weighted means over the first NUM_BATCHES batches of SPLIT (-1: all)."""
        model.eval()
        stream = self.eval_streams[split]
        count = len(stream) if num_batches < 0 else min(num_batches, len(stream))
        totals, pairs = [mx.array(0.0)] * len(self.names), 0
        for index in range(count):
            batch = stream.batch(index)
            loss, _, *stats = self.loss(model, *self.arrays(split, batch))
            totals = [t + v * batch.num_pairs for t, v in zip(totals, (loss, *stats), strict=True)]
            pairs += batch.num_pairs
            mx.eval(totals)
            clear_cache(clear_cache_threshold)
        return {name: total.item() / pairs for name, total in zip(self.names, totals, strict=True)}


def preference_objective(config: FinetuneConfig, model: nn.Module, tokenizer: Any,
                         template: str | None, console: Console) -> PreferenceObjective:
    """The pairs of config.data as streams and the reference; call it before the adapters are
    applied, so that cached reference log-probabilities are the base model's."""
    splits = load_preference_dir(config.data, Encoder(tokenizer, template), config.max_seq_length)
    if config.test and "test" not in splits:
        raise ElmError(f"{config.data}: --test needs a test.jsonl")
    for split in splits.values():
        console.print(split.summary())
    streams = {"train": preference_stream(splits["train"], config.batch_size,
                                          config.max_seq_length, config.seed, training=True)}
    eval_streams = {name: preference_stream(split, config.batch_size, config.max_seq_length,
                                            config.seed, training=False)
                    for name, split in splits.items()}
    reference = None
    if config.dpo:
        ref_model = None
        if config.ref_model is not None:
            ref_model = load_model(config.ref_model)
            ref_model.freeze()
            ref_model.eval()
            if ref_model.spec.vocab_size != model.spec.vocab_size:
                raise ElmError(f"--ref-model {config.ref_model}: vocabulary of "
                               f"{ref_model.spec.vocab_size}, the model's is "
                               f"{model.spec.vocab_size}")
        cache = config.cache_ref_logps
        if config.fine_tune_type == "full" and ref_model is None and not cache:
            console.print("note: full fine-tuning leaves no base model to compare with, so its "
                          "reference log-probabilities are computed once before training "
                          "(--cache-ref-logps)")
            cache = True
        reference = Reference(ref_model, mean=config.ipo)
        if cache:
            model.eval()
            for name, stream in eval_streams.items():
                reference.fill(model, name, stream, config.clear_cache_threshold)
            reference.ref_model = None  # cached: a second model is no longer needed
            console.print(f"reference log-probabilities cached for "
                          f"{sum(len(s.pairs) for s in eval_streams.values())} pairs")
    settings = {key: getattr(config, key) for key in
                ("dpo", "orpo", "beta", "label_smoothing", "ipo", "ref_model")}
    settings["train_pairs"] = len(splits["train"].pairs)
    return PreferenceObjective(config, streams, eval_streams, reference, model, settings)
