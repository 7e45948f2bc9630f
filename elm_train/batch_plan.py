"""The global batch of an optimizer step: processes x micro-batch x sequence x accumulation.

A recipe states its global batch in tokens (CoreNet's: 16 sequences x 128 GPUs x 2048 tokens,
docs/reference.md section 3); the accumulation that comes nearest to it on this world size and
micro-batch is derived here, and `elm train` prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    seq_len: int
    accumulation: int
    target_tokens: int = 0  # 0: no target, the accumulation was given

    @property
    def tokens_per_micro_step(self) -> int:
        return self.world_size * self.micro_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_micro_step * self.accumulation

    @property
    def exact(self) -> bool:
        return not self.target_tokens or self.tokens_per_step == self.target_tokens

    def line(self) -> str:
        processes = "process" if self.world_size == 1 else "processes"
        text = (f"batch plan: {self.world_size} {processes} x micro-batch {self.micro_batch_size} "
                f"x seq {self.seq_len} x accumulation {self.accumulation} = "
                f"{self.tokens_per_step:,} tokens per step")
        if self.target_tokens:
            text += f" ({_distance(self.tokens_per_step, self.target_tokens)})"
        return text

    def warning(self) -> str | None:
        """Why the target is missed, or None when it is met exactly (or there is none)."""
        if self.exact:
            return None
        return (f"train.global_batch_tokens {self.target_tokens:,} is not a multiple of "
                f"{self.world_size} x {self.micro_batch_size} x {self.seq_len} = "
                f"{self.tokens_per_micro_step:,} tokens per micro-step; the nearest is "
                f"accumulation {self.accumulation}, "
                f"{_distance(self.tokens_per_step, self.target_tokens)}")


def plan_batch(world_size: int, micro_batch_size: int, seq_len: int, grad_accum_steps: int = 1,
               target_tokens: int = 0) -> BatchPlan:
    """The plan for TARGET_TOKENS per step (nearest accumulation, at least 1), or for the given
    GRAD_ACCUM_STEPS when there is no target."""
    accumulation = grad_accum_steps
    if target_tokens > 0:
        per_micro_step = world_size * micro_batch_size * seq_len
        accumulation = max(1, (target_tokens + per_micro_step // 2) // per_micro_step)
    return BatchPlan(world_size, micro_batch_size, seq_len, accumulation, max(0, target_tokens))


def _distance(tokens: int, target: int) -> str:
    if tokens == target:
        return f"exactly the target {target:,}"
    return f"{100 * (tokens - target) / target:+.2f}% from the target {target:,}"
