"""DPO, IPO and ORPO on MLX: the losses and rewards against the NumPy reference, learning a
preference, exact resume after kill -9, and adapters that fuse."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.cli import run_elm
from support.lora import write_jsonl
from support.preference import dpo_reference, ends_with_rows, orpo_reference, sequence_logps

from elm_mlx.lora.config import build_config
from elm_spec import ElmError


@pytest.fixture(scope="module")
def base_dir(make_model_dir) -> Path:
    return make_model_dir(seed=21)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("pairs")
    rows = ends_with_rows(376, seed=0)
    write_jsonl(data / "train.jsonl", rows[:320])
    write_jsonl(data / "valid.jsonl", rows[320:360])
    write_jsonl(data / "test.jsonl", rows[360:])
    return data


def settings(base_dir: Path, data: Path, adapters: Path, **overrides) -> dict:
    return {"model": str(base_dir), "data": str(data), "adapter_path": str(adapters),
            "dpo": True, "beta": 0.1, "batch_size": 4, "iters": 4, "rank": 4,
            "chat_template": "none", "max_seq_length": 64, **overrides}


def randomized_adapters(model) -> None:
    """Seeded random LoRA matrices (B nonzero, so that the policy differs from the base)."""
    from mlx.utils import tree_flatten

    mx.random.seed(3)
    model.load_weights([(name, mx.random.normal(value.shape) * 0.2)
                        for name, value in tree_flatten(model.trainable_parameters())
                        if name.endswith(("lora_a", "lora_b"))], strict=False)


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("few")
    write_jsonl(data / "train.jsonl", ends_with_rows(12, seed=5))
    write_jsonl(data / "valid.jsonl", ends_with_rows(4, seed=6))
    return data


VARIANTS = {"sigmoid": {}, "label-smoothing": dict(label_smoothing=0.2), "ipo": dict(ipo=True),
            "cached": dict(cache_ref_logps=True), "orpo": dict(dpo=False, orpo=True, beta=0.25)}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_loss_and_rewards_equal_the_numpy_reference(base_dir, few_pairs, tmp_path, variant):
    """The training loss and the metrics of one batch, from per-answer log-probabilities that
    NumPy computes from the whole logits of the adapted model and of a separately loaded
    base (the reference DPO compares with)."""
    import io

    from rich.console import Console

    import elm_mlx
    from elm_mlx.lora.adapters import apply_fine_tune
    from elm_mlx.lora.preference import preference_objective

    config = build_config(None, settings(base_dir, few_pairs, tmp_path / "a", **variant))
    model, tokenizer = elm_mlx.load(base_dir)
    objective = preference_objective(config, model, tokenizer, None, Console(file=io.StringIO()))
    apply_fine_tune(model, config)
    randomized_adapters(model)
    batch = objective.streams["train"].training_batch(0)
    values = [v.item() for v in objective.loss(model, *objective.train_arrays(0))]
    loss, tokens, *stats = values

    base, _ = elm_mlx.load(base_dir)
    policy = sequence_logps(np.array(model(mx.array(batch.inputs))), batch.targets, batch.weights)
    ref = sequence_logps(np.array(base(mx.array(batch.inputs))), batch.targets, batch.weights)
    lengths = batch.weights.sum(axis=1)
    half = batch.num_pairs
    if config.orpo:
        expected = orpo_reference(policy[:half], policy[half:], lengths[:half], lengths[half:],
                                  config.beta)
    else:
        if config.ipo:
            policy, ref = policy / lengths, ref / lengths
        expected = dpo_reference(policy[:half], policy[half:], ref[:half], ref[half:],
                                 config.beta, config.label_smoothing, config.ipo)
    assert abs(expected["reward_margin"]) > 1e-3  # the adapters changed the answers' scores
    assert tokens == lengths.sum()
    names = ["loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"]
    assert dict(zip(names, [loss, *stats], strict=True)) == pytest.approx(
        {n: expected[n] for n in names}, rel=1e-4, abs=1e-5)


def test_reference_from_a_given_model_and_with_adapters_disabled_agree(base_dir, few_pairs,
                                                                       tmp_path):
    """--ref-model BASE computes what switching the adapters off computes."""
    import io

    from rich.console import Console

    import elm_mlx
    from elm_mlx.lora.adapters import apply_fine_tune
    from elm_mlx.lora.preference import preference_objective

    losses = {}
    for ref in (None, base_dir):
        config = build_config(None, settings(base_dir, few_pairs, tmp_path / "a",
                                             ref_model=ref and str(ref)))
        model, tokenizer = elm_mlx.load(base_dir)
        objective = preference_objective(config, model, tokenizer, None, Console(file=io.StringIO()))
        apply_fine_tune(model, config)
        randomized_adapters(model)
        losses[ref] = objective.loss(model, *objective.train_arrays(0))[0].item()
    assert losses[None] == pytest.approx(losses[base_dir], abs=1e-6)


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_disabled_adapters_give_the_base_model(base_dir, tmp_path, kind):
    """The reference pass of DoRA and of LoRA on a quantized base is the base model itself,
    and the adapters are back afterwards."""
    from support.lora import make_quantized_model_dir

    from elm_mlx.loading import load_model
    from elm_mlx.lora.adapters import apply_fine_tune
    from elm_mlx.lora.preference import adapters_disabled

    model_dir = make_quantized_model_dir(base_dir, tmp_path / "q") if kind == "qlora" else base_dir
    model, base = load_model(model_dir), load_model(model_dir)
    config = build_config(None, {"model": "m", "data": "d", "dpo": True,
                                 "fine_tune_type": "dora" if kind == "dora" else "lora"})
    apply_fine_tune(model, config)
    randomized_adapters(model)
    ids = mx.array([[1, 40, 300, 269, 285, 419, 461, 2, 77]])
    adapted = np.array(model(ids))
    with adapters_disabled(model):
        np.testing.assert_allclose(np.array(model(ids)), np.array(base(ids)), atol=1e-5)
    assert np.abs(adapted - np.array(base(ids))).max() > 1e-2
    np.testing.assert_array_equal(np.array(model(ids)), adapted)


@pytest.mark.parametrize(("flags", "message"), [
    (dict(dpo=True, orpo=True), "--dpo and --orpo exclude each other"),
    (dict(orpo=True, ref_model="x"), "--ref-model: --orpo uses no reference model"),
    (dict(dpo=False, ipo=True), "--ipo: it needs --dpo"),
    (dict(dpo=True, beta=0.0), "--beta must be a positive number"),
    (dict(dpo=True, label_smoothing=0.5), "--label-smoothing must be in [0, 0.5)"),
    (dict(dpo=True, ipo=True, label_smoothing=0.1), "--label-smoothing applies to the sigmoid"),
    (dict(dpo=True, pack=True), "--pack does not apply to preference pairs"),
])
def test_bad_preference_flags_are_named(flags, message):
    with pytest.raises(ElmError, match=None) as caught:
        build_config(None, {"model": "m", "data": "d", **flags})
    assert message in str(caught.value)


def metrics(adapters: Path) -> list[dict]:
    return [json.loads(line) for line in (adapters / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_learns_to_prefer_answers_ending_with_a_token(base_dir, pairs_dir, tmp_path):
    """Held-out reward accuracy goes from a coin's 0.5 (policy = reference) to above 0.9, and
    the fused model scores the pairs as the adapters do."""
    import elm_mlx
    from elm_mlx.lora.fuse import fuse
    from elm_mlx.lora.train import finetune

    adapters = tmp_path / "adapters"
    results = finetune(build_config(None, settings(
        base_dir, pairs_dir, adapters, iters=24, batch_size=8, learning_rate=3e-3, rank=8,
        steps_per_eval=24, steps_per_report=8, val_batches=-1, lr_schedule="constant",
        test=True, test_batches=-1)))
    assert results["initial_val_reward_accuracy"] == 0.5
    assert results["initial_val_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert results["val_reward_accuracy"] > 0.9
    assert results["val_reward_margin"] > 0 and results["val_loss"] < np.log(2)
    assert results["test_reward_accuracy"] > 0.9 and "test_perplexity" not in results
    train = [m for m in metrics(adapters) if "train_loss" in m]
    assert {"train_chosen_reward", "train_rejected_reward", "train_reward_margin",
            "train_reward_accuracy"} <= set(train[-1])
    assert train[-1]["train_reward_accuracy"] > train[0]["train_reward_accuracy"]
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["dpo"] is True

    fused = fuse(base_dir, adapters, tmp_path / "fused")
    ids = mx.array([[1, 40, 300, 269, 285, 419, 461, 2, 77]])
    adapted, _ = elm_mlx.load(base_dir, adapter_path=adapters)
    merged, _ = elm_mlx.load(fused)
    np.testing.assert_allclose(np.array(merged(ids)), np.array(adapted(ids)), atol=1e-4)


def dpo_args(model: Path, data: Path, adapters: Path, *extra: str) -> list[str]:
    return ["finetune", "--dpo", "--model", str(model), "--data", str(data), "--adapter-path",
            str(adapters), "--iters", "4", "--batch-size", "2", "--save-every", "2",
            "--steps-per-eval", "4", "--val-batches", "2", "--rank", "2", "--learning-rate",
            "1e-2", "--chat-template", "none", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("kind", [{}, {"fine_tune_type": "full", "num_layers": 1}],
                         ids=["lora", "full-cached"])
def test_killed_dpo_run_resumes_to_the_uninterrupted_result(base_dir, few_pairs, tmp_path, kind):
    """Killed right after its first checkpoint, a resumed run ends with the adapters of a run
    never interrupted (full fine-tuning: its cached reference is the base model's again)."""
    extra = [arg for key, value in kind.items()
             for arg in (f"--{key.replace('_', '-')}", str(value))]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = run_elm(*dpo_args(base_dir, few_pairs, whole, *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val loss 0.6931, chosen reward 0.0000" in done.stdout
    killed = run_elm(*dpo_args(base_dir, few_pairs, resumed, *extra),
                     env={"ELM_CRASH_AT": "finetune-checkpoint"})
    assert killed.returncode == -9, killed.stderr
    assert not (resumed / "adapters.safetensors").exists()
    again = run_elm(*dpo_args(base_dir, few_pairs, resumed, *extra), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "(step 2)" in again.stdout
    expected, got = (mx.load(str(d / "adapters.safetensors")) for d in (whole, resumed))
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.array(got[key]), np.array(value), err_msg=key)
    from elm_mlx.lora.train import finetune

    with pytest.raises(ElmError, match=r"was written with beta=0\.1, this run has beta=0\.5"):
        finetune(build_config(None, settings(base_dir, few_pairs, resumed, beta=0.5, resume=True,
                                             iters=4, batch_size=2, rank=2, learning_rate=1e-2,
                                             max_seq_length=None, **kind)))
