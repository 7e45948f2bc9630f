"""The batch plan: accumulation derived from a global batch in tokens, against hand arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.training import losses, train_in_process, write_config

from elm_spec import ElmError
from elm_train.batch_plan import plan_batch
from elm_train.config import RECIPES, load_config

CORENET = 4_194_304  # docs/reference.md section 3: 16 sequences x 128 GPUs x 2048 tokens


@pytest.mark.parametrize(("world", "micro", "target", "accumulation", "tokens"), [
    (128, 16, CORENET, 1, 128 * 16 * 2048),      # CoreNet's own run
    (8, 16, CORENET, 16, 8 * 16 * 2048 * 16),    # one node: 262,144 per micro-step, 16 of them
    (3, 16, CORENET, 43, 43 * 98_304),           # 4,194,304 / 98,304 = 42.67 -> 43
    (1, 4, 100_000, 12, 12 * 8192),              # 100,000 / 8,192 = 12.2 -> 12
    (256, 16, CORENET, 1, 2 * CORENET),          # one micro-step already holds twice the target
])
def test_accumulation_is_the_nearest_to_the_target(world: int, micro: int, target: int,
                                                   accumulation: int, tokens: int) -> None:
    plan = plan_batch(world, micro, 2048, target_tokens=target)
    assert (plan.accumulation, plan.tokens_per_step) == (accumulation, tokens)
    assert plan.exact is (tokens == target)
    assert (plan.warning() is None) is (tokens == target)


def test_plan_lines_name_every_factor_and_the_distance() -> None:
    assert plan_batch(8, 16, 2048, target_tokens=CORENET).line() == (
        "batch plan: 8 processes x micro-batch 16 x seq 2048 x accumulation 16 = "
        "4,194,304 tokens per step (exactly the target 4,194,304)")
    missed = plan_batch(3, 16, 2048, target_tokens=CORENET)
    # 43 x 98,304 = 4,227,072 = 4,194,304 x 1.0078125
    assert missed.line().endswith("= 4,227,072 tokens per step (+0.78% from the target 4,194,304)")
    assert missed.warning() == (
        "train.global_batch_tokens 4,194,304 is not a multiple of 3 x 16 x 2048 = 98,304 tokens "
        "per micro-step; the nearest is accumulation 43, +0.78% from the target 4,194,304")
    given = plan_batch(1, 4, 2048, grad_accum_steps=3)
    assert given.line() == ("batch plan: 1 process x micro-batch 4 x seq 2048 x accumulation 3 "
                            "= 24,576 tokens per step")
    assert given.warning() is None


def test_recipes_state_corenets_global_batch() -> None:
    for name in RECIPES:
        train = load_config(data={"recipe": name, "data": {"synthetic": True}}).train
        assert (train.micro_batch_size, train.seq_len, train.global_batch_tokens) == (16, 2048, CORENET)


def test_accumulation_and_a_target_together_are_refused() -> None:
    with pytest.raises(ElmError, match=r"train.grad_accum_steps: derived from "
                                       r"train.global_batch_tokens \(4194304\)"):
        load_config(data={"recipe": "openelm-270m", "data": {"synthetic": True}},
                    overrides=["train.grad_accum_steps=4"])
    config = load_config(data={"recipe": "openelm-270m", "data": {"synthetic": True}},
                         overrides=["train.grad_accum_steps=4", "train.global_batch_tokens=0"])
    assert config.train.grad_accum_steps == 4


def test_train_derives_the_accumulation_and_prints_the_plan(
        token_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1 process x 2 x 32 = 64 tokens per micro-step; a 128-token target is 2 micro-steps,
    # the same steps as giving the accumulation.
    derived = write_config(tmp_path / "derived.yaml", token_data, tmp_path / "derived",
                           train={"micro_batch_size": 2, "global_batch_tokens": 128})
    given = write_config(tmp_path / "given.yaml", token_data, tmp_path / "given",
                         train={"micro_batch_size": 2, "grad_accum_steps": 2})
    train_in_process(derived, "train.max_steps=3")
    out = capsys.readouterr().out
    assert ("batch plan: 1 process x micro-batch 2 x seq 32 x accumulation 2 = 128 tokens per "
            "step (exactly the target 128)") in out.splitlines()
    train_in_process(given, "train.max_steps=3")
    assert losses(tmp_path / "derived") == losses(tmp_path / "given")
    train_in_process(derived, "train.global_batch_tokens=100", "log.run_dir=" + str(tmp_path / "odd"))
    err = capsys.readouterr().err
    assert ("warning: train.global_batch_tokens 100 is not a multiple of 1 x 2 x 32 = 64 tokens "
            "per micro-step; the nearest is accumulation 2, +28.00% from the target 100") in err
