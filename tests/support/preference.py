"""An independent NumPy account of the preference losses, and a synthetic preference task.

Both twins' DPO and ORPO are checked against these functions, written from the papers
(Rafailov et al. 2023, DPO; Azar et al. 2023, IPO; Hong et al. 2024, ORPO) in float64 and
sharing nothing with either backend.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from .lora import UPPER_TO_LOWER_LETTERS


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def sequence_logps(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum over each row of WEIGHTS * log softmax(LOGITS)[TARGETS]: [N, T, V] logits -> [N]."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return (picked * np.asarray(weights, np.float64)).sum(axis=-1)


def reward_stats(chosen_rewards: np.ndarray, rejected_rewards: np.ndarray) -> dict[str, float]:
    """Means over the pairs; accuracy counts a tie (no preference yet) as half right."""
    margin = chosen_rewards - rejected_rewards
    return {"chosen_reward": float(chosen_rewards.mean()),
            "rejected_reward": float(rejected_rewards.mean()),
            "reward_margin": float(margin.mean()),
            "reward_accuracy": float(((margin > 0) + 0.5 * (margin == 0)).mean())}


def dpo_reference(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
                  beta: float, label_smoothing: float = 0.0, ipo: bool = False
                  ) -> dict[str, float]:
    """Mean DPO loss over the pairs, from per-answer log-probabilities (summed over the answer's
    tokens; for IPO the per-token means), and the implicit rewards beta * (policy - ref).

    sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h), h = (pc - pr) - (rc - rr)
    IPO:     (h - 1 / (2 beta))^2
    """
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in
                      (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    h = (pc - pr) - (rc - rr)
    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = (-(1.0 - label_smoothing) * log_sigmoid(beta * h)
                  - label_smoothing * log_sigmoid(-beta * h))
    return {"loss": float(losses.mean()), **reward_stats(beta * (pc - rc), beta * (pr - rr))}


def orpo_reference(chosen_logps: Any, rejected_logps: Any, chosen_lengths: Any,
                   rejected_lengths: Any, beta: float) -> dict[str, float]:
    """ORPO: the chosen answers' token-mean NLL minus beta * mean log s(log odds ratio), where
    the odds of an answer are p / (1 - p) of its per-token mean log-probability p. Rewards are
    beta * those means (there is no reference model)."""
    chosen_sum, rejected_sum = (np.asarray(x, np.float64) for x in (chosen_logps, rejected_logps))
    chosen_n, rejected_n = (np.asarray(x, np.float64) for x in (chosen_lengths, rejected_lengths))
    chosen_mean, rejected_mean = chosen_sum / chosen_n, rejected_sum / rejected_n
    log_odds = ((chosen_mean - rejected_mean)
                - (np.log1p(-np.exp(chosen_mean)) - np.log1p(-np.exp(rejected_mean))))
    nll = -chosen_sum.sum() / chosen_n.sum()
    ratio = log_sigmoid(log_odds)
    return {"loss": float(nll - beta * ratio.mean()), "nll": float(nll),
            "log_odds_ratio": float(ratio.mean()),
            **reward_stats(beta * chosen_mean, beta * rejected_mean)}


def ends_with_rows(count: int, marker: str = "s", seed: int = 0) -> list[dict[str, str]]:
    """A preference a random model does not have: of two answers to "A B C" that differ only
    in their last letter, prefer the one ending with MARKER ("a b s" over "a b d").

    Every letter, the marker included, is one token of the test tokenizer."""
    rng = random.Random(seed)
    letters = [c for c in UPPER_TO_LOWER_LETTERS if c != marker]
    rows = []
    for _ in range(count):
        prompt = [rng.choice(letters) for _ in range(3)]
        body = [rng.choice(letters) for _ in range(rng.randint(1, 3))]
        rows.append({"prompt": " ".join(c.upper() for c in prompt),
                     "chosen": " ".join([*body, marker]),
                     "rejected": " ".join([*body, rng.choice(letters)])})
    return rows
