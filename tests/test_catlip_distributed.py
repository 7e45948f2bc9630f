"""The CLIP loss with features gathered across two gloo ranks equals the full-batch loss."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from elm_train.catlip.clip import contrastive_loss

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (F.normalize(torch.randn(8, 16, generator=generator), dim=-1),
            F.normalize(torch.randn(8, 16, generator=generator), dim=-1))


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images, texts = _features()
    local_images = images[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    local_texts = texts[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    loss = contrastive_loss(local_images, local_texts, torch.tensor(10.0))
    loss.backward()
    torch.save((loss.item(), local_images.grad, local_texts.grad), f"{out}/{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()
    # The results are on disk: skip interpreter teardown, where gloo's threads can still abort
    # the process ("terminate called without an active exception") on a loaded machine.
    os._exit(0)


def test_gathered_loss_and_gradients_match_the_full_batch(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    images, texts = _features()
    images.requires_grad_()
    texts.requires_grad_()
    full = contrastive_loss(images, texts, torch.tensor(10.0))
    full.backward()
    # DDP averages over ranks: mean of the rank losses, gradients summed by all_gather's backward
    assert abs((results[0][0] + results[1][0]) / 2 - full.item()) < 1e-5
    image_grad = torch.cat([results[0][1], results[1][1]]) / 2
    text_grad = torch.cat([results[0][2], results[1][2]]) / 2
    torch.testing.assert_close(image_grad, images.grad)
    torch.testing.assert_close(text_grad, texts.grad)
