"""The loader, config and schedule, checked against independent computations (in-process, fast)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support.cli import REPO
from support.training import final_weights, losses, train_in_process, write_config

from elm_spec import ElmError
from elm_train.config import RECIPES, load_config
from elm_train.data.format import Shard, write_index
from elm_train.data.loader import TokenWindowLoader
from elm_train.trainer import lr_multiplier, parameter_groups


def counting_data(directory: Path, lengths: tuple[int, ...]) -> Path:
    """Shards holding 0, 1, 2, ... in order, so every token names its position in the stream."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for number, length in enumerate(lengths):
        path = directory / f"train-{number:05d}.bin"
        np.arange(start, start + length, dtype=np.uint32).tofile(path)
        shards.append(Shard(path, length))
        start += length
    write_index(directory, np.dtype(np.uint32), 100_000, 2, {"train": shards}, {})
    return directory


def test_windows_cross_shards_and_cover_each_epoch_once(tmp_path: Path) -> None:
    data = counting_data(tmp_path, (50, 7, 80))  # 137 tokens -> 15 windows of 9
    loader = TokenWindowLoader(data, "train", seq_len=8, micro_batch_size=3, seed=4)
    assert loader.num_windows == 15 and loader.batches_per_epoch == 5
    seen = []
    for _ in range(5):
        batch = next(loader)
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        for row in torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1):
            assert row[0] % 9 == 0 and torch.equal(row, torch.arange(row[0], row[0] + 9))
            seen.append(int(row[0]) // 9)
    assert sorted(seen) == list(range(15))
    assert loader.state_dict() == {"epoch": 1, "step": 0, "seed": 4}
    next_epoch = [int(next(loader)["input_ids"][0, 0]) for _ in range(5)]
    assert next_epoch != [s * 9 for s in seen[::3]]  # a new permutation


def test_global_batch_is_the_same_for_any_world_size(tmp_path: Path) -> None:
    data = counting_data(tmp_path, (1000,))
    single = TokenWindowLoader(data, "train", 8, 4, seed=1)
    ranks = [TokenWindowLoader(data, "train", 8, 2, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for _ in range(30):  # more than one epoch
        whole = next(single)["input_ids"]
        parts = torch.cat([next(loader)["input_ids"] for loader in ranks])
        assert torch.equal(whole, parts)


def test_loader_state_restores_the_exact_position(tmp_path: Path) -> None:
    data = counting_data(tmp_path, (1000,))
    loader = TokenWindowLoader(data, "train", 8, 4, seed=3)
    for _ in range(40):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader)["input_ids"] for _ in range(5)]
    restored = TokenWindowLoader(data, "train", 8, 4, seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(next(restored)["input_ids"], e) for e in expected)
    with pytest.raises(ElmError, match=r"data\.seed is 9"):
        TokenWindowLoader(data, "train", 8, 4, seed=9).load_state_dict(state)


def test_too_little_data_for_a_batch_is_named(tmp_path: Path) -> None:
    data = counting_data(tmp_path, (30,))
    with pytest.raises(ElmError, match=r"'train' split has 30 tokens, 3 windows .* needs 8"):
        TokenWindowLoader(data, "train", 8, 4, world_size=2)


def test_schedule_is_warmup_then_cosine_to_the_floor() -> None:
    config = load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True},
                               "optim": {"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}})
    optim = config.optim
    assert lr_multiplier(0, optim, 110) * 1e-3 == pytest.approx(1e-6)
    assert lr_multiplier(5, optim, 110) * 1e-3 == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_multiplier(10, optim, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, optim, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, optim, 110) == pytest.approx(0.1)
    assert lr_multiplier(60 + 25, optim, 110) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 75 / 100)))


def test_no_weight_decay_on_one_dimensional_parameters() -> None:
    from elm_spec import ModelSpec
    from elm_train.model import OpenELM

    model = OpenELM(ModelSpec.from_preset("elm-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert "transformer.token_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_recipe_yaml_and_overrides_stack(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("recipe: openelm-270m\ndata: {synthetic: true}\noptim: {warmup_steps: 10}\n")
    config = load_config(path, ["optim.lr=2e-4", "train.max_steps=20"])
    assert config.model.preset == "OpenELM-270M"
    assert config.optim.lr == 2e-4 and config.optim.warmup_steps == 10
    assert config.optim.betas == [0.9, 0.95] and config.optim.z_loss == 1e-4
    assert config.train.max_steps == 20 and config.train.dtype == "bfloat16"


def published_recipes() -> dict[str, list[str]]:
    """The recipe table of docs/reference.md section 3 (CoreNet's configs): name -> row cells."""
    text = (REPO / "docs" / "reference.md").read_text()
    section = text.split("## 3. ", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| openelm")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_recipes_are_corenets_published_settings() -> None:
    published = published_recipes()
    assert sorted(published) == sorted(RECIPES)
    for name, (preset, lr, checkpointing, strategy) in published.items():
        config = load_config(data={"recipe": name, "data": {"synthetic": True}})
        assert config.model.preset == preset and config.optim.lr == float(lr), name
        assert config.train.activation_checkpointing == (
            "full" if checkpointing == "yes" else "none"), name
        assert config.parallel.strategy == strategy, name
        assert (config.optim.warmup_steps, config.train.max_steps) == (5000, 350_000), name


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("trian.seq_len=8", "unknown key 'trian'"),
    ("train.seq_len=abc", "train.seq_len: expected an integer, got 'abc'"),
    ("parallel.strategy=zero3", "parallel.strategy: 'zero3' is not one of"),
    ("recipe=openelm-9b", "unknown recipe 'openelm-9b'"),
    ("train.max_steps=0", "train.max_steps: must be positive"),
    ("data.shards=x", "unknown key 'data.shards'"),
])
def test_bad_config_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ElmError, match=message.replace("(", r"\(")):
        load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True}},
                    overrides=[override])


def test_gradient_accumulation_matches_the_larger_batch(token_data: Path, tmp_path: Path) -> None:
    big = write_config(tmp_path / "big.yaml", token_data, tmp_path / "big")
    accumulated = write_config(tmp_path / "acc.yaml", token_data, tmp_path / "acc",
                               train={"micro_batch_size": 2, "grad_accum_steps": 2})
    train_in_process(big, "train.max_steps=5")
    train_in_process(accumulated, "train.max_steps=5")
    for ours, theirs in zip(losses(tmp_path / "acc"), losses(tmp_path / "big"), strict=True):
        assert abs(ours - theirs) / theirs <= 1e-5


@pytest.mark.slow
def test_export_and_plot_from_the_command_line(token_data: Path, tmp_path: Path) -> None:
    from support.cli import run_elm

    from elm_train import load_model

    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run",
                          checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(config, "train.max_steps=3")
    result = run_elm("export", str(tmp_path / "ckpt"), str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    model = load_model(tmp_path / "model")
    weights = final_weights(tmp_path / "ckpt")
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == (
        token_data / "tokenizer.model").read_bytes()
    again = run_elm("export", str(tmp_path / "ckpt"), str(tmp_path / "model"))
    assert again.returncode == 1 and "already exists" in again.stderr
    plotted = run_elm("plot", str(tmp_path / "run"))
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threads_default_to_the_cores_the_load_average_leaves_idle(monkeypatch) -> None:
    from elm_spec import platform
    from elm_train.parallel import choose_cpu_threads

    monkeypatch.setattr(platform.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, processes, expected in [(0.0, 1, 4), (1.2, 1, 3), (3.9, 1, 1), (9.0, 1, 1),
                                      (0.0, 2, 2), (2.0, 4, 1)]:
        monkeypatch.setattr(platform.os, "getloadavg", lambda load=load: (load, load, load))
        assert platform.idle_cores(processes) == expected, (load, processes)

    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(platform.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
        line = choose_cpu_threads("cpu")
        assert torch.get_num_threads() == 1 and "load average 1.0 on 4 cores" in line
        assert choose_cpu_threads("cpu", 3).startswith("torch threads: 3 per process (train.threads")
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert "(OMP_NUM_THREADS)" in choose_cpu_threads("cpu") and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_a_throughput_collapse_is_reported_once_until_it_recovers() -> None:
    from elm_train.trainer import ThroughputWatch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        watch = ThroughputWatch()
        said = [watch.check(rate) for rate in (300, 690, 500, 240, 64, 70, 600, 100, None)]
        assert [bool(s) for s in said] == [False, False, False, False, True, False, False, True,
                                           False]
        assert said[4].startswith("throughput fell to 64/s from 690/s")
        assert "fewer torch threads than 2 help (train.threads=1" in said[4]
        torch.set_num_threads(1)  # nothing to lower
        one = ThroughputWatch()
        assert one.check(900) is None and "threads" not in one.check(90)
    finally:
        torch.set_num_threads(threads)
