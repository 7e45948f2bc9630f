"""`elm init` and `elm inspect`: model directories written, read back and described."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from support.cli import run_elm

from elm_spec import ModelSpec
from elm_spec.modeldir import read_tensor_index
from elm_train import load_model
from elm_train.model import OpenELM


def test_init_writes_a_loadable_model_directory(tmp_path: Path, tokenizer_dir: Path) -> None:
    destination = tmp_path / "tiny"
    result = run_elm("init", str(destination), "--preset", "elm-tiny", "--tokenizer",
                     str(tokenizer_dir), "--seed", "3")
    assert result.returncode == 0, result.stderr
    config = json.loads((destination / "config.json").read_text())
    spec = ModelSpec.from_config(config)
    assert spec == ModelSpec.from_preset("elm-tiny")
    assert {"tokenizer.model", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in destination.iterdir()}
    model = load_model(destination)
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters()
    # Same seed, same weights: the directory holds exactly what init_weights produced.
    reference = OpenELM(spec)
    reference.init_weights(torch.Generator().manual_seed(3))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_init_says_what_a_tokenizer_changes_or_that_there_is_none(tmp_path: Path,
                                                                  tokenizer_dir: Path) -> None:
    small = ModelSpec.from_preset("elm-small")  # vocab 2048; the tokenizer has 512 pieces
    sized = small.replace(vocab_size=512)
    shrunk = run_elm("init", str(tmp_path / "a"), "--preset", "elm-small", "--tokenizer",
                     str(tokenizer_dir / "tokenizer.model"))
    assert shrunk.returncode == 0, shrunk.stderr
    assert ModelSpec.from_config(json.loads((tmp_path / "a/config.json").read_text())) == sized
    assert (f"the embedding shrinks to 512 rows ({small.num_parameters() / 1e6:,.1f}M -> "
            f"{sized.num_parameters() / 1e6:,.1f}M parameters") in shrunk.stdout
    assert "pass --vocab-size 2048" in shrunk.stdout

    kept = run_elm("init", str(tmp_path / "b"), "--preset", "elm-small", "--vocab-size", "2048",
                   "--tokenizer", str(tokenizer_dir))
    assert kept.returncode == 0 and "shrinks" not in kept.stdout
    assert (tmp_path / "b/tokenizer.model").is_file()

    bare = run_elm("init", str(tmp_path / "c"), "--preset", "elm-tiny")
    assert bare.returncode == 0 and not (tmp_path / "c/tokenizer.model").exists()
    assert f"note: {tmp_path / 'c'} has no tokenizer" in bare.stdout and "--tokenizer" in bare.stdout

    missing = run_elm("init", str(tmp_path / "d"), "--preset", "elm-tiny", "--tokenizer",
                      str(tmp_path))
    assert missing.returncode == 1 and not (tmp_path / "d").exists()
    assert missing.stderr.strip() == f"error: --tokenizer {tmp_path}: no tokenizer.model in that directory"


def test_init_follows_corenet_initialisation() -> None:
    """docs/reference.md section 1, worked out by hand for elm-small (d 256, 6 layers): every
    linear weight N(0, 256^-0.5 = 0.0625) but out_proj and proj_2, N(0, 256^-0.5 * 12^-0.5 =
    0.018042); the embedding N(0, 0.0625); norms 1."""
    spec = ModelSpec.from_preset("elm-small")
    assert (spec.model_dim, spec.num_transformer_layers) == (256, 6)
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    for name, weight in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(weight == 1), name
            continue
        expected = 0.018042 if name.endswith(("out_proj.weight", "proj_2.weight")) else 0.0625
        assert weight.std().item() == pytest.approx(expected, rel=0.03), name
        assert abs(weight.mean().item()) < 0.1 * expected, name


def test_init_in_bfloat16_and_from_a_spec_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("num_transformer_layers: 3\nmodel_dim: 96\nhead_dim: 24\n"
                         "num_gqa_groups: 1\nqkv_multipliers: 1.0\nffn_multipliers: [1.0, 3.0]\n"
                         "ffn_dim_divisor: 8\nvocab_size: 300\n")
    destination = tmp_path / "model"
    result = run_elm("init", str(destination), "--spec", str(spec_file), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    tensors = read_tensor_index(destination)
    assert {info.dtype for info in tensors.values()} == {"BF16"}
    assert ModelSpec.from_config(json.loads((destination / "config.json").read_text())).ffn_dims == [96, 192, 288]


def test_init_refuses_an_existing_directory_and_replaces_it_with_force(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    result = run_elm("init", str(destination), "--preset", "elm-tiny")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {destination}: already exists and is not empty (use --force to replace it)"]
    assert (destination / "keep.txt").read_text() == "mine"
    result = run_elm("init", str(destination), "--preset", "elm-tiny", "--force")
    assert result.returncode == 0, result.stderr
    assert not (destination / "keep.txt").exists() and (destination / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or backup left behind


def test_init_rejects_a_bad_spec_file_naming_the_key(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("num_transformer_layers: 2\nmodel_dim: 64\nhead_dim: 16\nmodel_dimm: 3\n")
    result = run_elm("init", str(tmp_path / "out"), "--spec", str(spec_file))
    assert result.returncode == 1
    assert "model_dimm" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_describes_the_directory(make_model_dir) -> None:
    directory = make_model_dir(ModelSpec.from_preset("elm-tiny"))
    result = run_elm("inspect", str(directory), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    spec = ModelSpec.from_preset("elm-tiny")
    assert f"{spec.num_parameters():,}" in result.stdout
    assert "512 pieces" in result.stdout
    assert "32.00 bits per parameter" in result.stdout
    for i in range(spec.num_transformer_layers):
        row = (rf"│\s*{i}\s*│\s*[\d.]+\s*│\s*{spec.num_query_heads[i]}\s*│\s*{spec.num_kv_heads[i]}\s*│"
               rf"\s*[\d.]+\s*│\s*{spec.ffn_dims[i]}\s*│")
        assert re.search(row, result.stdout), f"layer {i} row missing"


def test_inspect_names_a_wrongly_shaped_tensor(make_model_dir, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = make_model_dir()
    weights = load_file(str(directory / "model.safetensors"))
    weights["transformer.layers.1.ffn.proj_2.weight"] = weights["transformer.layers.1.ffn.proj_2.weight"][:, :-1].contiguous()
    save_file(weights, str(directory / "model.safetensors"))
    result = run_elm("inspect", str(directory))
    assert result.returncode == 1
    assert "transformer.layers.1.ffn.proj_2.weight" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
