"""`elm bench` grids and the cost model: reading, validation naming the entry, price lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support.cli import run_elm

from elm_spec import ElmError
from elm_train.bench import cost
from elm_train.bench.grid import check_devices, load_grid, read_grid


def grid_from(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_paper_preset_is_the_studys_grid() -> None:
    grid = load_grid(preset="paper")
    cells = grid.cells
    assert {c.model for c in cells} == {"llama-100M", "llama-500M", "llama-1B", "llama-2B"}
    assert {c.batch_size for c in cells} == {4, 8, 16, 32, 64}
    assert {c.attention for c in cells} == {"eager", "flash"}
    assert {c.strategy for c in cells} == {"ddp", "fsdp", "fsdp-grad-op"}
    assert {c.world_size for c in cells} == {1, 2, 4, 8, 16, 32, 64}
    assert {(c.seq_len, c.dtype) for c in cells} == {(1024, "bfloat16")}
    assert len(cells) == 4 * 5 * 2 * 3 * 7
    assert all(c.settings.repeats >= 3 and c.settings.steps_per_repeat == 10 for c in cells)
    # The study's LLaMA-style sizes (docs/reference.md section 4).
    shapes = {c.model: (c.spec().num_transformer_layers, c.spec().model_dim) for c in cells}
    assert shapes == {"llama-100M": (9, 864), "llama-500M": (15, 1536), "llama-1B": (19, 1920),
                      "llama-2B": (24, 2496)}


def test_sweeps_cross_their_axes_and_override_the_top_level(tmp_path: Path) -> None:
    spec = tmp_path / "specs" / "mini.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({"num_transformer_layers": 2, "model_dim": 32, "head_dim": 8,
                                    "num_gqa_groups": 1, "vocab_size": 64, "ffn_dim_divisor": 16,
                                    "max_context_length": 128}))
    path = grid_from(tmp_path, {
        "seq_len": 64, "dtype": "float32", "repeats": 4, "models": ["elm-tiny", "specs/mini.yaml"],
        "sweeps": [{"batch_sizes": [2, 4], "attention": ["eager", "sdpa"]},
                   {"batch_sizes": 8, "strategies": ["fsdp", "fsdp-grad-op"], "gpus": 2,
                    "repeats": 3, "train": {"train.activation_checkpointing": True}}]})
    grid = load_grid(path)
    first = [c for c in grid.cells if c.strategy == "ddp"]
    second = [c for c in grid.cells if c.strategy != "ddp"]
    assert len(first) == 2 * 2 * 2 and len(second) == 2 * 2
    assert {c.settings.repeats for c in first} == {4} and {c.settings.repeats for c in second} == {3}
    assert {c.model_name for c in grid.cells} == {"elm-tiny", "mini"}
    assert str(spec.resolve()) in {c.model for c in grid.cells}
    assert dict(second[0].settings.train) == {"train.activation_checkpointing": True}
    assert len({c.key for c in grid.cells}) == len(grid.cells)
    assert len({c.slug for c in grid.cells}) == len(grid.cells)
    # The explicit form written for SLURM arrays reads back to the same cells, in order.
    again = read_grid(yaml.safe_load(grid.to_yaml()), "again", tmp_path)
    assert [c.key for c in again.cells] == [c.key for c in grid.cells]
    assert [c.settings for c in again.cells] == [c.settings for c in grid.cells]


@pytest.mark.parametrize(("data", "message"), [
    ({"models": "elm-tiny", "batch_sizes": [4, 0]}, "batch_sizes[1]: must be a positive integer, got 0"),
    ({"models": "elm-tiny", "batch_sizes": [4, "8"]}, "batch_sizes[1]: must be a positive integer, got '8'"),
    ({"models": "elm-tiny", "batch_sizes": 2.5}, "batch_sizes: must be a positive integer, got 2.5"),
    ({"models": "elm-tiny", "batch_sizes": 4, "seq_len": 64,
      "sweeps": [{"gpus": 1}, {"strategies": ["ddp", "zero3"]}]},
     "sweeps[1].strategies[1]: unknown strategy 'zero3'"),
    ({"models": ["elm-tiny", "llama-7B"], "batch_sizes": 4}, "models[1]: unknown preset 'llama-7B'"),
    ({"models": "missing.yaml", "batch_sizes": 4}, "models: spec file"),
    ({"models": "elm-tiny", "batch_sizes": 4, "attention": "xformers"},
     "attention: unknown attention backend 'xformers'"),
    ({"models": "elm-tiny", "batch_sizes": 4, "batch_size": 8}, "batch_size: unknown key"),
    ({"models": "elm-tiny", "batch_sizes": 4, "repeats": 2}, "repeats: must be an integer >= 3"),
    ({"models": "elm-tiny", "batch_sizes": 4, "seq_len": 4096}, "cell 'elm-tiny batch 4 sdpa ddp 1x1 seq 4096 bfloat16': seq_len 4096 is longer than elm-tiny's max_context_length 256"),
    ({"models": "elm-tiny", "batch_sizes": 4, "gpus": 2, "seq_len": 64, "strategies": "none"},
     "strategy 'none' cannot run on 2 devices"),
    ({"models": "elm-tiny", "batch_sizes": 4, "seq_len": 64, "loss_budget_tokens": 1000},
     "loss_budget_tokens: needs data_path"),
    ({"batch_sizes": 4}, "no 'models' given"),
])
def test_bad_grids_are_rejected_naming_the_entry(tmp_path: Path, data: dict, message: str) -> None:
    path = grid_from(tmp_path, data)
    with pytest.raises(ElmError) as error:
        load_grid(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_more_devices_than_exist_is_rejected_per_cell(tmp_path: Path) -> None:
    grid = load_grid(grid_from(tmp_path, {"models": "elm-tiny", "batch_sizes": 4, "gpus": [1, 4], "seq_len": 64}))
    check_devices(grid.__class__(grid.source, grid.cells[:1]), 2, "cpu", False, multi_node=False)
    with pytest.raises(ElmError, match=r"gpus 4 is more than the 2 processes allowed on this CPU"):
        check_devices(grid, 2, "cpu", False, multi_node=False)
    with pytest.raises(ElmError, match=r"gpus 4 is more than the 1 cuda devices per node"):
        check_devices(grid, 1, "cuda", False, multi_node=False)
    two_nodes = load_grid(grid_from(tmp_path, {"models": "elm-tiny", "batch_sizes": 4, "nodes": 2, "seq_len": 64}))
    with pytest.raises(ElmError, match="nodes 2 needs a cluster"):
        check_devices(two_nodes, 8, "cuda", False, multi_node=False)
    check_devices(two_nodes, 8, "cuda", False, multi_node=True)
    flash = load_grid(grid_from(tmp_path, {"models": "elm-tiny", "batch_sizes": 4, "attention": "flash", "seq_len": 64}))
    with pytest.raises(ElmError, match="attention 'flash' needs the flash-attn package"):
        check_devices(flash, 1, "cuda", False, multi_node=False)


def test_cli_rejects_a_grid_before_anything_runs(tmp_path: Path) -> None:
    """A valid grid asking for more processes than this machine allows: nothing starts."""
    path = grid_from(tmp_path, {"models": "elm-tiny", "batch_sizes": 4, "gpus": [1, 3],
                                "seq_len": 32, "dtype": "float32"})
    out = tmp_path / "sweep"
    result = run_elm("bench", "--grid", str(path), "--out", str(out), "--max-cpu-processes", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: cell 'elm-tiny batch 4 sdpa ddp 1x3 seq 32 float32': gpus 3 is more "
        "than the 2 processes allowed on this CPU machine (raise it with --max-cpu-processes)"]
    assert not out.exists()


def test_price_table_matches_devices_and_prices_token_per_dollar(tmp_path: Path) -> None:
    table = cost.load_prices()
    assert table.unit == "relative"
    assert {k: table.price_per_hour(k) for k in ("A100-40GB", "A100-80GB", "H100-80GB")} == {
        "A100-40GB": 1.00, "A100-80GB": 1.46, "H100-80GB": 2.53}
    names = {"NVIDIA A100-SXM4-40GB": "A100-40GB", "NVIDIA A100-PCIE-40GB": "A100-40GB",
             "NVIDIA A100-SXM4-80GB": "A100-80GB", "NVIDIA A100 80GB PCIe": "A100-80GB",
             "NVIDIA H100 80GB HBM3": "H100-80GB", "NVIDIA H200": "H200-141GB"}
    for name, expected in names.items():
        assert cost.device_type_for(cost.Device("cuda", name, 1), table) == expected
    assert cost.device_type_for(cost.Device("cpu", "x86_64", 0), table) == "cpu"
    with pytest.raises(ElmError, match="no entry matches the device 'NVIDIA L4'"):
        cost.device_type_for(cost.Device("cuda", "NVIDIA L4", 1), table)
    assert cost.device_type_for(cost.Device("cuda", "NVIDIA L4", 1), table, "H100-80GB") == "H100-80GB"
    # Token/$ = tokens/s x 3600 / price per hour.
    assert cost.tokens_per_dollar(1000.0, 2.0) == 1000.0 * 3600 / 2.0
    assert cost.cost_of_tokens(7.2e6, 1000.0, 2.0) == pytest.approx(7.2e6 / 1000.0 / 3600 * 2.0)
    # An edited table in dollars.
    mine = tmp_path / "prices.yaml"
    mine.write_text("unit: usd\ndevices:\n  L4: {price_per_hour: 0.8, match: ['L4$']}\n"
                    "  cpu: {price_per_hour: 0.1}\n")
    usd = cost.load_prices(mine)
    assert usd.unit == "usd" and usd.device_type("NVIDIA L4") == "L4" and usd.price_per_hour("L4") == 0.8
    mine.write_text("unit: usd\ndevices:\n  L4: {price_per_hour: -1}\n")
    with pytest.raises(ElmError, match=r"devices\.L4\.price_per_hour: must be a positive number"):
        cost.load_prices(mine)
