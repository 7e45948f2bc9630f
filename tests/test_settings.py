"""One settings layer: the same YAML values read alike by `elm train` configs, `elm bench`
grids, `elm finetune --config` and CatLIP's data section (elm_spec.settings)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from elm_spec import ElmError

# (YAML text, what a float setting holds, what an int setting holds); None: refused.
# YAML 1.1 reads `1e-5` as a string (no dot): a float setting takes the number it spells.
EDGE_VALUES = [
    ("1e-5", 1e-5, None),
    ("1.0e-5", 1e-5, None),
    ("5", 5.0, 5),
    ("7.0", 7.0, 7),
    ("7.5", 7.5, None),
    (".nan", None, None),
    (".inf", None, None),
    ("abc", None, None),
    ("true", None, None),
    ("[1]", None, None),
]


def train_reader(tmp_path: Path, key: str, raw: str):
    from elm_train.config import load_config

    section, name = {"float": ("optim", "lr"), "int": ("train", "max_steps")}[key]
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {{preset: elm-tiny}}\ndata: {{synthetic: true}}\n"
                    f"{section}:\n  {name}: {raw}\n")
    return getattr(getattr(load_config(path), section), name), f"{section}.{name}"


def finetune_reader(tmp_path: Path, key: str, raw: str):
    from elm_mlx.lora.config import build_config

    name = {"float": "learning_rate", "int": "iters"}[key]
    path = tmp_path / "lora.yaml"
    path.write_text(f"{name}: {raw}\n")
    return getattr(build_config(path, {"model": "m", "data": "d"}), name), name


def bench_reader(tmp_path: Path, key: str, raw: str):
    from elm_train.bench.grid import load_grid

    name = {"float": "lr", "int": "steps_per_repeat"}[key]
    path = tmp_path / "grid.yaml"
    path.write_text(f"models: elm-tiny\nbatch_sizes: 2\nseq_len: 64\n{name}: {raw}\n")
    return getattr(load_grid(path).cells[0].settings, name), name


def catlip_reader(tmp_path: Path, key: str, raw: str):
    from elm_train.config import load_config

    name = {"float": "crop_scale", "int": "image_size"}[key]
    value = f"[{raw}, 1.0]" if key == "float" else raw
    path = tmp_path / "catlip.yaml"
    path.write_text(f"task: catlip\nmodel: {{preset: vit-test}}\n"
                    f"data: {{vocab: v, train: t, {name}: {value}}}\n")
    read = getattr(load_config(path).task_data, name)
    return (read[0] if key == "float" else read), f"data.{name}"


READERS: dict[str, Callable] = {"train": train_reader, "finetune": finetune_reader,
                                "bench": bench_reader, "catlip": catlip_reader}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("raw", "as_float", "as_int"), EDGE_VALUES,
                         ids=[raw for raw, _, _ in EDGE_VALUES])
@pytest.mark.parametrize("kind", ["float", "int"])
def test_every_reader_reads_an_edge_value_alike(tmp_path, reader, raw, as_float, as_int, kind):
    expected = as_float if kind == "float" else as_int
    if expected is None:
        with pytest.raises(ElmError) as caught:
            READERS[reader](tmp_path, kind, raw)
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path) in message, message
        key = {"float": {"train": "optim.lr", "finetune": "learning_rate", "bench": "lr",
                         "catlip": "data.crop_scale"},
               "int": {"train": "train.max_steps", "finetune": "iters",
                       "bench": "steps_per_repeat", "catlip": "data.image_size"}}[kind][reader]
        assert key in message, message
        return
    value, _ = READERS[reader](tmp_path, kind, raw)
    assert type(value) is {"float": float, "int": int}[kind]
    assert math.isclose(value, expected, rel_tol=0, abs_tol=0), value


def test_unknown_keys_are_named_with_their_file(tmp_path):
    for reader, typo in (("train", "optim:\n  lrr: 1\n"), ("finetune", "learning_rat: 1\n"),
                         ("bench", "lrr: 1\n"), ("catlip", "")):
        path = tmp_path / f"{reader}.yaml"
        if reader == "catlip":
            path.write_text("task: catlip\nmodel: {preset: vit-test}\n"
                            "data: {vocab: v, train: t, image_sise: 32}\n")
        elif reader == "bench":
            path.write_text("models: elm-tiny\nbatch_sizes: 2\nseq_len: 64\n" + typo)
        elif reader == "train":
            path.write_text("model: {preset: elm-tiny}\ndata: {synthetic: true}\n" + typo)
        else:
            path.write_text(typo)
        with pytest.raises(ElmError) as caught:
            if reader == "finetune":
                from elm_mlx.lora.config import build_config
                build_config(path, {"model": "m", "data": "d"})
            elif reader == "bench":
                from elm_train.bench.grid import load_grid
                load_grid(path)
            else:
                from elm_train.config import load_config
                load_config(path)
        expected = {"train": "optim.lrr", "finetune": "learning_rat", "bench": "lrr",
                    "catlip": "data.image_sise"}[reader]
        assert str(path) in str(caught.value) and expected in str(caught.value), caught.value


def test_the_settings_layer_imports_neither_torch_nor_mlx():
    import subprocess
    import sys

    code = ("import sys, elm_spec.settings; "
            "print(sorted(m for m in ('torch', 'mlx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
