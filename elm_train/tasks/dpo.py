"""`task: dpo`: preference tuning of an OpenELM model on (prompt, chosen, rejected) pairs.

Losses, from per-answer log-probabilities (summed over the answer's tokens, the prompt masked):
- sigmoid, DPO (Rafailov et al. 2023): with h = (pc - rc) - (pr - rr), the policy's and the
  frozen reference's log-probabilities of the chosen and rejected answers,
  -(1 - eps) log s(beta h) - eps log s(-beta h) (eps: label smoothing, Mitchell 2023);
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2, from the per-token means;
- orpo (Hong et al. 2024), no reference model: the chosen answers' token-mean NLL minus
  beta * mean log s(log odds ratio), the odds of an answer p / (1 - p) of its per-token mean.
Rewards are beta * (policy - reference) (ORPO: beta * the policy's per-token mean); the
accuracy counts the pairs whose chosen reward is the higher, a tie as half.

The reference is `model.ref_model`, or else the policy's own initial weights (model.init_from,
or the seeded initialisation), rebuilt once, frozen, and sharded as the policy is under FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from elm_spec import ElmError
from elm_spec.chat_encoding import SentencePieceCodec
from elm_spec.chat_template import model_template, resolve_chat_template
from elm_spec.preference import PreferencePair, load_preference_split
from elm_spec.tokenizer import Tokenizer
from elm_train.config import Config
from elm_train.data.preference import PreferenceLoader
from elm_train.tasks.lm import LanguageModelTask

LOSSES = ("sigmoid", "ipo", "orpo")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
                      ) -> torch.Tensor:
    """[rows]: the sum over masked positions of log softmax(logits)[label], in float32."""
    logits = logits.float()
    target = logits.gather(-1, labels[..., None]).squeeze(-1)
    return ((target - torch.logsumexp(logits, dim=-1)) * loss_mask).sum(-1)


def reward_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    margin = chosen_reward - rejected_reward
    return {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
            "reward_margin": margin.mean(),
            "reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
             ipo: bool = False, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, {"loss" and the reward statistics}, detached)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if ipo:
        losses = (h - 1 / (2 * beta)).square()
    else:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    loss = losses.mean()
    return loss, {"loss": loss.detach(),
                  **reward_stats(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())}


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(ORPO loss, {"loss", "nll", "log_odds_ratio" and the reward statistics}, detached)."""
    chosen_mean = chosen_logps / chosen_lengths
    rejected_mean = rejected_logps / rejected_lengths
    # log(1 - exp(x)) as log(-expm1(x)): exact for x near 0 (an answer the model is sure of)
    log_odds = ((chosen_mean - rejected_mean)
                - (torch.log(-torch.expm1(chosen_mean)) - torch.log(-torch.expm1(rejected_mean))))
    nll = -chosen_logps.sum() / chosen_lengths.sum()
    ratio = F.logsigmoid(log_odds).mean()
    loss = nll - beta * ratio
    return loss, {"loss": loss.detach(), "nll": nll.detach(), "log_odds_ratio": ratio.detach(),
                  **reward_stats(beta * chosen_mean.detach(), beta * rejected_mean.detach())}


def batch_loss(policy_model: torch.nn.Module, reference_model: torch.nn.Module | None,
               batch: dict[str, torch.Tensor], data: PreferenceData
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of DATA.loss on a batch of elm_train.data.preference.PreferenceLoader (the
    reference is run under no_grad; ORPO needs none)."""
    inputs, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
    policy = sequence_logprobs(policy_model(inputs), labels, mask)
    pairs = policy.shape[0] // 2
    lengths = mask.sum(-1)
    if data.loss == "orpo":
        return orpo_loss(policy[:pairs], policy[pairs:], lengths[:pairs], lengths[pairs:],
                         data.beta)
    with torch.no_grad():
        reference = sequence_logprobs(reference_model(inputs), labels, mask)
    if data.loss == "ipo":
        policy, reference = policy / lengths, reference / lengths
    return dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:],
                    data.beta, ipo=data.loss == "ipo", label_smoothing=data.label_smoothing)


@dataclass
class PreferenceData:
    """The `data` section of a dpo run (besides the engine's `seed`)."""

    train: str | None = None
    valid: str | None = None
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # A Jinja file, or "none"; by default the tokenizer's template, else the shipped one.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if not self.train:
            raise ElmError("data.train is required: a JSONL file of prompt/chosen/rejected rows")
        if self.loss not in LOSSES:
            raise ElmError(f"data.loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ElmError(f"data.beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ElmError(f"data.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ElmError(f"data.label_smoothing: only the sigmoid loss has it, not {self.loss}")


class PreferenceTask(LanguageModelTask):
    """DPO, IPO or ORPO of an OpenELM model; exported and checkpointed as `task: lm` is."""

    data_config = PreferenceData
    full_rows = False  # a micro-batch item is a pair: two rows padded to the batch's longest
    valid_metrics = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")

    def __init__(self, config: Config):
        super().__init__(config)
        self.preference: PreferenceData = config.task_data
        if self.tokenizer_path is None:
            raise ElmError("task dpo needs a tokenizer: set model.tokenizer, or model.init_from "
                           "to a model directory holding tokenizer.model")
        if config.model.preset and config.model.vocab_size is None:
            self.spec = self.spec.replace(vocab_size=Tokenizer(self.tokenizer_path).vocab_size)
        self.reference: torch.nn.Module | None = None
        self._pairs: dict[str, list[PreferencePair]] = {}

    @property
    def uses_reference(self) -> bool:
        return self.preference.loss != "orpo"

    def setup(self, wrap_frozen) -> None:
        if self.uses_reference:
            self.reference = wrap_frozen(self._build_reference())

    def _build_reference(self) -> torch.nn.Module:
        path = self.config.model.ref_model
        if path is None:
            return self.build_model()
        from elm_train.modeldir import load_model

        reference = load_model(path, attention=self.config.model.attention).float()
        if reference.spec.vocab_size != self.spec.vocab_size:
            raise ElmError(f"model.ref_model: {path} has vocab_size {reference.spec.vocab_size}, "
                           f"the model {self.spec.vocab_size}")
        return reference

    def has_split(self, split: str) -> bool:
        return bool(getattr(self.preference, split))

    def _read_pairs(self, split: str, announce: bool) -> list[PreferencePair]:
        if split not in self._pairs:
            template = resolve_chat_template(self.preference.chat_template,
                                             model_template(self.tokenizer_path.parent))
            codec = SentencePieceCodec(self.tokenizer_path, template)
            loaded = load_preference_split(getattr(self.preference, split), codec,
                                           self.config.train.seq_len)
            if announce:
                print(f"data.{split}: {loaded.summary()}", flush=True)
            self._pairs[split] = loaded.pairs
        return self._pairs[split]

    def build_loader(self, split: str, rank: int, world_size: int) -> PreferenceLoader:
        train = self.config.train
        return PreferenceLoader(self._read_pairs(split, announce=rank == 0), train.seq_len,
                                train.micro_batch_size, rank, world_size, self.config.data.seed,
                                shuffle=split == "train", source=getattr(self.preference, split))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        return batch_loss(model, self.reference, batch, self.preference)

    def flops_per_item(self) -> float:
        # The policy's forward and backward, and the reference's forward: a third as much again.
        return super().flops_per_item() * (4 / 3 if self.uses_reference else 1)

