"""CatLIP vs CLIP training throughput on the same hardware (`elm catlip bench`).

Both models share the ViT image tower; CatLIP adds a linear head over the synset vocabulary
(CoreNet: 24,320), CLIP adds CoreNet's CLIP text tower (49,408 tokens, context 77, width 512,
12 layers) and projections. Each timed step is forward + backward + AdamW on random images,
multi-hot labels / random token ids. The two alternate (CatLIP, CLIP, CatLIP, ...) after
warm-up steps, so contention on a shared machine hits both alike; the median step is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from elm_spec.vit import ViTSpec
from elm_train.catlip.clip import CLIP, TextSpec, contrastive_loss
from elm_train.catlip.task import catlip_loss
from elm_train.catlip.vit import build_vit
from elm_train.modeldir import TORCH_DTYPES


@dataclass
class BenchResult:
    name: str
    step_times: list[float]
    batch_size: int
    parameters: int

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_step_s


def _catlip_step(spec: ViTSpec, batch: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[Callable[[], None], int]:
    model = build_vit(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device)
    labels = (torch.rand(batch, spec.num_classes, device=device) < 0.001).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = catlip_loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def _clip_step(spec: ViTSpec, text: TextSpec, batch: int, device: torch.device,
               dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    model = CLIP(spec, text)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device)
    tokens = torch.randint(1, text.vocab_size, (batch, text.context_length), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = contrastive_loss(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def run_bench(spec: ViTSpec, text: TextSpec, batch: int, steps: int, warmup: int,
              device: str = "cpu", dtype: str = "float32",
              progress: Callable[[], None] | None = None) -> tuple[BenchResult, BenchResult]:
    torch_device = torch.device(device)
    torch_dtype = TORCH_DTYPES[dtype]
    runners = {"CatLIP": _catlip_step(spec, batch, torch_device, torch_dtype),
               "CLIP": _clip_step(spec, text, batch, torch_device, torch_dtype)}
    times: dict[str, list[float]] = {name: [] for name in runners}

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    for round_index in range(warmup + steps):
        for name, (step, _) in runners.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
            if progress:
                progress()
    catlip, clip = (BenchResult(name, times[name], batch, runners[name][1]) for name in runners)
    return catlip, clip
