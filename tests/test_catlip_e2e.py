"""CatLIP through the whole command line: `elm train` (catlip and clip) -> `elm export` ->
`elm convert` -> `elm classify`, whose top-5 must be the exported PyTorch model's."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.cli import REPO, run_elm
from support.training import THREAD_ENV, TORCHRUN

from elm_spec import ElmError
from elm_spec.vit import eval_transform, load_rgb, read_catlip_config
from elm_train.catlip.modeldir import load_catlip_model
from elm_train.catlip.synthetic import draw_shape, write_shapes_shards
from elm_train.catlip.vocab import build_vocab
from elm_train.config import load_config
from elm_train.export import export_checkpoint

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catlip-e2e")
    write_shapes_shards(root / "train", 64, image_size=20, per_shard=32, seed=1)
    write_shapes_shards(root / "valid", 16, image_size=20, per_shard=32, seed=2)
    build_vocab([root / "train"], 100, root / "vocab", workers=1)
    (root / "vit.yaml").write_text("embed_dim: 32\nnum_layers: 2\nnum_heads: 2\nffn_dim: 64\n"
                                   "patch_size: 8\n")
    return root


def write_config(root: Path, task: str, **extra: str) -> Path:
    lines = [f"task: {task}", f"model: {{spec: {root / 'vit.yaml'}}}",
             "data:", f"  train: [{root / 'train'}]", f"  valid: [{root / 'valid'}]",
             f"  vocab: {root / 'vocab'}", "  image_size: 16", "  crop_scale: [0.6, 1.0]",
             "  num_workers: 0",
             "optim: {lr: 3.0e-3, warmup_steps: 1}",
             "train: {micro_batch_size: 8, max_steps: 4, dtype: float32, device: cpu, "
             "eval_batches: 1, activation_checkpointing: true}",
             f"checkpoint: {{dir: {root / task / 'ckpt'}}}",
             f"log: {{run_dir: {root / task / 'run'}, progress: false}}"]
    config = root / f"{task}.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_train_export_convert_classify(shapes, tmp_path):
    config = write_config(shapes, "catlip")
    trained = run_elm("train", str(config), env=THREAD_ENV)
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (shapes / "catlip/run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["items_per_s"] > 0 and r["skipped_images"] == 0 for r in steps)
    assert records[-1]["event"] == "end" and records[-1]["valid_loss"] > 0

    exported = tmp_path / "model"
    result = run_elm("export", str(shapes / "catlip/ckpt"), str(exported), env=THREAD_ENV)
    assert result.returncode == 0, result.stderr
    model, catlip = load_catlip_model(exported)
    assert catlip.vit.image_size == 16 and catlip.vit.num_layers == 2
    assert list(catlip.synsets) == [entry["id"] for entry in
                                    json.loads((shapes / "vocab/vocab.json").read_text())["synsets"]]

    converted = tmp_path / "model-mlx"
    result = run_elm("convert", str(exported), str(converted))
    assert result.returncode == 0, result.stderr
    vit = read_catlip_config(exported).vit
    assert (f"{converted}: MLX CatLIP directory, ViT {vit.num_layers} layers x {vit.embed_dim}, "
            f"{vit.image_size} px in {vit.patch_size} px patches, {vit.num_classes} synset classes"
            ) in result.stderr
    assert read_catlip_config(converted).framework == "mlx"

    image = tmp_path / "shape.png"
    draw_shape("triangle", "red", "white", 24, random.Random(3)).save(image)
    pixels = eval_transform(load_rgb(image), 16, catlip.crop_fraction, catlip.mean, catlip.std)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(pixels)[None]))[0]
    top = scores.argsort(descending=True)[:5].tolist()
    result = run_elm("classify", str(image), "--model", str(converted))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[0] for line in lines] == [catlip.synsets[i] for i in top]
    assert [float(line[2]) for line in lines] == pytest.approx(scores[top].tolist(), abs=1e-4)


def test_clip_task_trains_under_fsdp_and_exports_both_towers(shapes, tokenizer_dir, tmp_path):
    """Two gloo processes shard both towers' blocks (and the 1-element logit scale)."""
    config = write_config(shapes, "clip")
    trained = subprocess.run(
        [*TORCHRUN, "-m", "apps", "train", str(config), "train.max_steps=2",
         "parallel.strategy=fsdp", "data.context_length=12",
         f"data.tokenizer={tokenizer_dir / 'tokenizer.model'}",
         "model.text={width: 32, num_layers: 1, num_heads: 2, projection_dim: 16}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **THREAD_ENV})
    assert trained.returncode == 0, trained.stderr
    steps = [json.loads(line) for line in (shapes / "clip/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "event" not in r] == [1, 2]
    assert steps[0]["world_size"] == 2
    assert steps[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)

    export_checkpoint(shapes / "clip/ckpt", tmp_path / "clip")
    config_json = json.loads((tmp_path / "clip/config.json").read_text())
    assert config_json["model_type"] == "catlip_clip" and config_json["text"]["width"] == 32
    weights = load_file(tmp_path / "clip/model.safetensors")
    assert weights["text_encoder.token_embedding.weight"].shape == (512, 32)
    assert weights["image_projection.weight"].shape == (16, 32)
    assert not any("_checkpoint_wrapped_module" in name for name in weights)


def test_catlip_data_keys_are_validated_by_name(shapes):
    config = write_config(shapes, "catlip")
    with pytest.raises(ElmError, match=r"unknown key 'data\.image_sise'"):
        load_config(config, ["data.image_sise=16"])
    with pytest.raises(ElmError, match=r"data\.mean: expected a list of 3"):
        load_config(config, ["data.mean=[0.5, 0.5]"])
    assert load_config(config).task_data.crop_scale == (0.6, 1.0)
