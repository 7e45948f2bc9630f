"""CatLIP end to end on a synthetic set: pre-training mAP, transfer, MLX twin, elm classify, CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.cli import run_elm

from elm_spec.vit import load_rgb, read_catlip_config
from elm_train.catlip.clip import contrastive_loss
from elm_train.catlip.data import iterate_once
from elm_train.catlip.metrics import average_precision, mean_average_precision, predict
from elm_train.catlip.synthetic import write_shapes_folder, write_shapes_shards
from elm_train.catlip.task import CatLIPTask, CLIPTask, catlip_loss
from elm_train.catlip.vocab import build_vocab
from elm_train.config import Config, load_config

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

SPEC_YAML = "embed_dim: 96\nnum_layers: 2\nnum_heads: 2\nffn_dim: 192\npatch_size: 8\n"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(root: Path, **data) -> Config:
    """The `elm train` config of a catlip run on ROOT's shards, as the engine validates it."""
    (root / "spec.yaml").write_text(SPEC_YAML)
    return load_config(data={
        "task": "catlip", "model": {"spec": str(root / "spec.yaml")},
        "data": {"train": [str(root / "train")], "valid": [str(root / "valid")],
                 "vocab": str(root / "vocab"), "image_size": 32, "crop_scale": [0.6, 1.0],
                 "num_workers": 0, **data},
        "train": {"micro_batch_size": 32, "seed": 0}})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, single_thread) -> dict:
    """Pre-train a small ViT with CatLIP's loss on captioned shapes; export its model dir."""
    root = tmp_path_factory.mktemp("catlip-train")
    write_shapes_shards(root / "train", 1024, image_size=36, per_shard=512, seed=1)
    write_shapes_shards(root / "valid", 200, image_size=36, per_shard=512, seed=2)
    build_vocab([root / "train", root / "valid"], 100, root / "vocab", workers=1)
    task = CatLIPTask(run_config(root))
    model = task.build_model()
    loader = task.build_loader("train", rank=0, world_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    torch.manual_seed(0)
    losses = []
    for _ in range(160):
        loss, _ = task.loss(model, next(loader))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    logits, labels = predict(model, iterate_once(task.dataset("valid"), 100))
    export = task.export(model.state_dict(), root / "model")
    return {"root": root, "task": task, "model": model.eval(), "logits": logits,
            "labels": labels, "losses": losses, "dir": export}


def test_pretraining_reaches_map_on_held_out_images(pretrained):
    task = pretrained["task"]
    assert task.vocabulary.names[:1] == ("background.n.01",) and len(task.vocabulary) == 10
    score = mean_average_precision(pretrained["logits"], pretrained["labels"])
    per_class = dict(zip(task.vocabulary.names,
                         average_precision(pretrained["logits"], pretrained["labels"]).tolist(),
                         strict=True))
    assert score >= 0.9, per_class
    assert np.mean(pretrained["losses"][-20:]) < 0.4 * pretrained["losses"][0]


def test_average_precision_matches_its_definition():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert float(average_precision(scores, targets)[0]) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_catlip_loss_is_bce_summed_over_labels_divided_by_batch():
    logits = torch.randn(3, 5)
    targets = (torch.rand(3, 5) > 0.5).float()
    by_hand = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).sum() / 3
    torch.testing.assert_close(catlip_loss(logits, targets), by_hand)


def test_export_writes_a_catlip_directory(pretrained):
    config = read_catlip_config(pretrained["dir"])
    assert config.synsets == pretrained["task"].vocabulary.ids
    assert config.names[0] == "background.n.01" and config.vit.image_size == 32
    assert (pretrained["dir"] / "vocab.pkl").is_file() and (pretrained["dir"] / "vocab.json").is_file()


def test_transfer_init_beats_random_init(pretrained, single_thread):
    from elm_train.catlip.modeldir import load_catlip_model
    from elm_train.catlip.transfer import run_transfer

    folder = write_shapes_folder(pretrained["root"] / "folder", per_class=40, image_size=36, seed=9)
    model, config = load_catlip_model(pretrained["dir"])
    result = run_transfer(model, config, folder, steps=6, batch_size=24, lr=3e-4, seed=0)
    assert result.matched == ["circle.n.01", "square.n.01", "triangle.n.01"]
    assert result.transfer_accuracy > result.random_accuracy + 0.15, result


def test_mlx_twin_and_conversion_match_pytorch(pretrained, tmp_path):
    import mlx.core as mx

    from convert.catlip import convert_catlip, is_catlip_source
    from elm_mlx.catlip import load_catlip

    assert is_catlip_source(pretrained["dir"]) and not is_catlip_source(tmp_path)
    convert_catlip(pretrained["dir"], tmp_path / "mlx")
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = pretrained["model"](torch.from_numpy(images)).numpy()
    for directory in (pretrained["dir"], tmp_path / "mlx"):
        model, _ = load_catlip(directory)
        got = np.array(model(mx.array(images.transpose(0, 2, 3, 1))))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_classify_command_gives_the_pytorch_top5(pretrained, tmp_path):
    import random

    from elm_spec.vit import eval_transform
    from elm_train.catlip.synthetic import draw_shape

    image = tmp_path / "shape.png"
    draw_shape("triangle", "blue", "white", 40, random.Random(4)).save(image)
    config = read_catlip_config(pretrained["dir"])
    pixels = eval_transform(load_rgb(image), 32, config.crop_fraction, config.mean, config.std)
    with torch.no_grad():
        scores = torch.sigmoid(pretrained["model"](torch.from_numpy(pixels)[None]))[0]
    top = scores.argsort(descending=True)[:5].tolist()
    result = run_elm("classify", str(image), "--model", str(pretrained["dir"]))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[0] for line in lines] == [config.synsets[i] for i in top]
    assert [line[1] for line in lines] == [config.names[i] for i in top]
    np.testing.assert_allclose([float(line[2]) for line in lines], scores[top].numpy(), atol=1e-4)


def test_unreadable_image_for_classification_is_named(tmp_path):
    from elm_spec import ElmError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ElmError, match=r"bad\.jpg: not a readable image"):
        load_rgb(bad)


def test_contrastive_loss_matches_independent_computation():
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    expected = 0
    for i in range(4):
        expected -= torch.log_softmax(logits[i], 0)[i] / 8 + torch.log_softmax(logits[:, i], 0)[i] / 8
    torch.testing.assert_close(contrastive_loss(image, text, scale), expected)


def test_clip_task_trains_on_the_same_data(pretrained, tokenizer_dir, single_thread):
    config = run_config(pretrained["root"], tokenizer=str(tokenizer_dir / "tokenizer.model"),
                        context_length=16)
    config.train.micro_batch_size = 8
    config.model.text = {"width": 64, "num_layers": 1, "num_heads": 2, "projection_dim": 32}
    task = CLIPTask(config)
    model = task.build_model()
    batch = next(task.build_loader("train", 0, 1))
    assert batch["text"].shape == (8, 16) and task.items_in(batch) == 8
    # MFU's numerator counts both towers and projections: torch's count of one forward pass.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch["images"], batch["text"])
    assert counter.get_total_flops() == task.flops_per_item() / 3 * 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, metrics = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert metrics["logit_scale"] > 0


@pytest.mark.parametrize("patch_size", [8, 16])
def test_vit_flops_per_image_equals_torchs_flop_counter(patch_size):
    """MFU's numerator for CatLIP: one forward pass counted by torch's FlopCounterMode (math
    attention, which the counter sees in full) is a third of flops_per_image."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from elm_spec.vit import ViTSpec
    from elm_train.catlip.vit import build_vit

    spec = ViTSpec.from_preset("vit-test", num_layers=2, image_size=64, patch_size=patch_size)
    images = torch.randn(3, 3, spec.image_size, spec.image_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        build_vit(spec)(images)
    assert counter.get_total_flops() == spec.flops_per_image() / 3 * len(images)
