"""`elm train` with `task: dpo`: the losses against the NumPy account, the same numbers as the MLX
twin, a preference learnt, two processes as one, and exact resume after kill -9."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import yaml
from support.preference import dpo_reference, ends_with_rows, orpo_reference, sequence_logps
from support.training import (
    losses,
    run_under_torchrun,
    start_train,
    step_records,
    train_in_process,
    wait_for,
)

from elm_mlx import load_model as load_mlx_model
from elm_spec import ElmError, ModelSpec
from elm_train.checkpoint import complete_checkpoints
from elm_train.config import load_config
from elm_train.export import export_checkpoint
from elm_train.parallel import init_distributed
from elm_train.tasks import task_class
from elm_train.trainer import evaluate

LOSS_SETTINGS = {
    "sigmoid": {"loss": "sigmoid", "beta": 0.5},
    "smoothed": {"loss": "sigmoid", "beta": 0.3, "label_smoothing": 0.2},
    "ipo": {"loss": "ipo", "beta": 0.4},
    "orpo": {"loss": "orpo", "beta": 0.25},
}


@pytest.fixture(scope="module")
def preference(make_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A policy and another reference model (elm-tiny), synthetic pairs: prefer ending in "s"."""
    root = tmp_path_factory.mktemp("preference")
    for split, count, seed in (("train", 128, 0), ("valid", 32, 1)):
        rows = ends_with_rows(count, seed=seed)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = ModelSpec.from_preset("elm-tiny")
    return {"root": root, "model": make_model_dir(spec, seed=0),
            "reference": make_model_dir(spec, seed=1)}


def dpo_settings(preference: dict[str, Path], run_dir: Path, **sections: dict) -> dict:
    settings = {
        "task": "dpo",
        "model": {"init_from": str(preference["model"])},
        "data": {"train": str(preference["root"] / "train.jsonl"),
                 "valid": str(preference["root"] / "valid.jsonl")},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "train": {"seq_len": 64, "micro_batch_size": 4, "max_steps": 6, "dtype": "float32",
                  "eval_batches": 4},
        "log": {"run_dir": str(run_dir), "progress": False, "peak_flops": 1e11},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    return settings


def write_dpo_config(path: Path, preference: dict[str, Path], run_dir: Path, **sections: dict
                     ) -> Path:
    path.write_text(yaml.safe_dump(dpo_settings(preference, run_dir, **sections)))
    return path


def task_with_reference(settings: dict):
    """The task and its policy as `elm train` builds them in one process."""
    config = load_config(data=settings)
    task = task_class("dpo")(config)
    task.setup(lambda frozen: frozen.requires_grad_(False))
    return task, task.build_model()


def numpy_account(logits: np.ndarray, reference_logits: np.ndarray | None,
                  batch: dict[str, torch.Tensor], settings: dict) -> dict[str, float]:
    targets, weights = batch["labels"].numpy(), batch["loss_mask"].numpy()
    pairs = len(targets) // 2
    policy = sequence_logps(logits, targets, weights)
    lengths = weights.sum(-1)
    if settings["loss"] == "orpo":
        return orpo_reference(policy[:pairs], policy[pairs:], lengths[:pairs], lengths[pairs:],
                              settings["beta"])
    reference = sequence_logps(reference_logits, targets, weights)
    if settings["loss"] == "ipo":
        policy, reference = policy / lengths, reference / lengths
    return dpo_reference(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:],
                         settings["beta"], settings.get("label_smoothing", 0.0),
                         ipo=settings["loss"] == "ipo")


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("name", LOSS_SETTINGS)
def test_losses_and_rewards_equal_the_numpy_account(name: str, preference: dict[str, Path],
                                                    tmp_path: Path) -> None:
    settings = LOSS_SETTINGS[name]
    task, model = task_with_reference(dpo_settings(
        preference, tmp_path / "run", data=settings,
        model={"ref_model": str(preference["reference"])}))
    batch = next(task.build_loader("train", 0, 1))
    assert batch["input_ids"].shape[0] == 8 and batch["loss_mask"].sum() > 0
    loss, parts = task.loss(model, batch)
    loss.backward()  # the loss is what trains the policy
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        logits = model(batch["input_ids"]).numpy()
        reference_logits = None
        if task.reference is not None:
            assert not any(p.requires_grad for p in task.reference.parameters())
            reference_logits = task.reference(batch["input_ids"]).numpy()
    expected = numpy_account(logits, reference_logits, batch, settings)
    assert (task.reference is None) == (name == "orpo")
    assert expected.keys() <= parts.keys()
    for key, value in expected.items():
        assert float(parts[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Two different models: the rewards are far from zero, and not all pairs agree.
    assert abs(expected["reward_margin"]) > 1e-3 and expected["reward_accuracy"] not in (0.0, 1.0)


def mlx_loss(preference: dict[str, Path], batch: dict[str, torch.Tensor], settings: dict
             ) -> dict[str, float]:
    """The MLX twin's own objective (elm_mlx.lora.preference) on the same weights and batch."""
    from elm_mlx.lora.preference import METRICS, answer_logps, dpo_loss, orpo_loss

    arrays = [mx.array(batch[key].numpy()) for key in ("input_ids", "labels", "loss_mask")]
    logps, tokens = answer_logps(load_mlx_model(preference["model"]), *arrays)
    pairs = logps.shape[0] // 2
    beta = settings["beta"]
    if settings["loss"] == "orpo":
        values = orpo_loss(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:], beta)
    else:
        ref, _ = answer_logps(load_mlx_model(preference["reference"]), *arrays)
        ipo = settings["loss"] == "ipo"
        if ipo:
            logps, ref = logps / tokens, ref / tokens
        values = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta,
                          settings.get("label_smoothing", 0.0), ipo)
    return {name: value.item() for name, value in zip(METRICS, values, strict=True)}


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("name", LOSS_SETTINGS)
def test_mlx_gives_the_same_loss_on_the_same_weights_and_batch(name: str,
                                                               preference: dict[str, Path],
                                                               tmp_path: Path) -> None:
    settings = LOSS_SETTINGS[name]
    task, model = task_with_reference(dpo_settings(
        preference, tmp_path / "run", data=settings,
        model={"ref_model": str(preference["reference"])}))
    batch = next(task.build_loader("train", 0, 1))
    with torch.no_grad():
        _, parts = task.loss(model, batch)
    on_mlx = mlx_loss(preference, batch, settings)
    assert abs(on_mlx["reward_margin"]) > 1e-3
    for key, value in on_mlx.items():
        assert float(parts[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_bad_settings_are_named(preference: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        ({"data": {"loss": "kto"}}, "data.loss: 'kto' is not one of sigmoid, ipo, orpo"),
        ({"data": {"beta": 0}}, "data.beta: must be positive"),
        ({"data": {"loss": "ipo", "label_smoothing": 0.1}}, "data.label_smoothing: only"),
        ({"data": {"path": "tokens"}}, "data.path / data.synthetic: task dpo reads"),
        ({"data": {"train": None}}, "data.train is required"),
    ]
    for sections, message in cases:
        with pytest.raises(ElmError, match=re.escape(message)):
            load_config(data=dpo_settings(preference, tmp_path / "run", **sections))
    with pytest.raises(ElmError, match=re.escape("model.ref_model: only task dpo")):
        load_config(data={"model": {"preset": "elm-tiny", "ref_model": "x"},
                          "data": {"synthetic": True}})


def test_a_token_target_for_the_global_batch_is_refused(preference: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """A pair is two rows padded to the batch's longest: micro-batch x seq_len does not count
    its tokens, so no accumulation can be derived from train.global_batch_tokens."""
    path = write_dpo_config(tmp_path / "config.yaml", preference, tmp_path / "run",
                            train={"global_batch_tokens": 4096})
    with pytest.raises(ElmError, match=re.escape(
            "train.global_batch_tokens: task dpo batches 4 items that are not rows of seq_len "
            "tokens; give train.grad_accum_steps")):
        train_in_process(path)
    assert not list((tmp_path / "run").glob("metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.usefixtures("single_torch_thread")
def test_held_out_reward_accuracy_rises_from_a_half(preference: dict[str, Path],
                                                    tmp_path: Path) -> None:
    settings = dpo_settings(preference, tmp_path / "run", train={"max_steps": 12,
                                                                 "micro_batch_size": 8})
    task, model = task_with_reference(settings)
    before = evaluate(task, model, init_distributed("cpu"), 4, contextlib.nullcontext())
    # The reference is the initial policy: every pair a tie, half right.
    assert before["valid_reward_accuracy"] == 0.5 and before["valid_reward_margin"] == 0.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = train_in_process(path)
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["valid_loss"] == result.valid_loss
    assert end["valid_reward_accuracy"] > 0.9 and end["valid_reward_margin"] > 0
    records = step_records(tmp_path / "run")
    assert {"chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= records[0].keys()
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow
def test_two_processes_give_one_process_losses(preference: dict[str, Path],
                                               tmp_path: Path) -> None:
    single = tmp_path / "single"
    train_in_process(write_dpo_config(tmp_path / "single.yaml", preference, single / "run",
                                      train={"max_steps": 3}))
    strategies = ("ddp", "fsdp")
    for strategy in strategies:
        write_dpo_config(tmp_path / f"{strategy}.yaml", preference, tmp_path / strategy / "run",
                         train={"max_steps": 3, "micro_batch_size": 2},
                         parallel={"strategy": strategy})
    script = (
        "from elm_train.config import load_config\n"
        "from elm_train.trainer import train\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        f"for strategy in {strategies!r}:\n"
        f"    train(load_config({str(tmp_path)!r} + f'/{{strategy}}.yaml'))\n"
        "dist.destroy_process_group()\n")
    result = run_under_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reference = step_records(single / "run")
    for strategy in strategies:
        records = step_records(tmp_path / strategy / "run")
        assert len(records) == len(reference) == 3
        for ours, theirs in zip(records, reference, strict=True):
            for key in ("loss", "reward_margin", "reward_accuracy"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (strategy, key)
        assert records[0]["world_size"] == 2


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(preference: dict[str, Path], tmp_path: Path) -> None:
    sections = {"train": {"max_steps": 6}}
    straight = write_dpo_config(tmp_path / "straight.yaml", preference, tmp_path / "straight-run",
                                checkpoint={"dir": str(tmp_path / "straight-ckpt")}, **sections)
    straight_process = start_train(straight)
    killed_ckpt = tmp_path / "killed-ckpt"
    killed = write_dpo_config(tmp_path / "killed.yaml", preference, tmp_path / "killed-run",
                              checkpoint={"dir": str(killed_ckpt), "every": 3}, **sections)
    process = start_train(killed)
    wait_for(lambda: (killed_ckpt / "step-3").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert [step for step, _ in complete_checkpoints(killed_ckpt)] == [3]

    resumed = start_train(killed)
    for running in (resumed, straight_process):
        _, stderr = running.communicate(timeout=300)
        assert running.returncode == 0, stderr
    ours = export_checkpoint(killed_ckpt, tmp_path / "ours")
    theirs = export_checkpoint(tmp_path / "straight-ckpt", tmp_path / "theirs")
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    reference = {r["step"]: r for r in step_records(tmp_path / "straight-run")}
    for record in step_records(tmp_path / "killed-run"):
        if record["step"] > 3:
            for key in ("loss", "chosen_reward", "rejected_reward"):
                assert record[key] == reference[record["step"]][key], (record["step"], key)
    assert losses(tmp_path / "killed-run")[-1] == losses(tmp_path / "straight-run")[-1]
