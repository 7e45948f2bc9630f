"""A synthetic image-caption set of coloured shapes, for tests, demos and benchmarks.

`write_shapes_shards` writes img2dataset-style tar shards (`KEY.jpg`, `KEY.txt`, `KEY.json`)
whose captions read like "a red circle on a white background"; `write_shapes_folder` writes
an ImageFolder tree (one directory per shape) for transfer.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
           "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}


def draw_shape(shape: str, colour: str, background: str, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    # kept clear of the borders, so that crops and centre crops keep the whole shape
    extent = rng.uniform(0.5, 0.7) * size
    left = (size - extent) / 2 + rng.uniform(-0.08, 0.08) * size
    top = (size - extent) / 2 + rng.uniform(-0.08, 0.08) * size
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)],
                     fill=fill)
    return image


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shapes_shards(directory: str | Path, num_samples: int, image_size: int = 64,
                        per_shard: int = 256, seed: int = 0) -> list[Path]:
    """Tar shards 00000.tar, 00001.tar, ... of random shapes with their captions."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    for start in range(0, num_samples, per_shard):
        path = directory / f"{len(shards):05d}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(start, min(start + per_shard, num_samples)):
                shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
                background = rng.choice(list(BACKGROUNDS))
                key = f"{index:09d}"
                caption = f"a {colour} {shape} on a {background} background"
                _add(archive, f"{key}.jpg", _jpeg(draw_shape(shape, colour, background,
                                                             image_size, rng)))
                _add(archive, f"{key}.txt", caption.encode())
                _add(archive, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        shards.append(path)
    return shards


def write_shapes_folder(directory: str | Path, per_class: int, image_size: int = 64,
                        seed: int = 0, classes: tuple[str, ...] = SHAPES) -> Path:
    """DIRECTORY/<shape>/<n>.jpg, colours and backgrounds at random."""
    rng = random.Random(seed)
    directory = Path(directory)
    for shape in classes:
        (directory / shape).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = draw_shape(shape, rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)),
                               image_size, rng)
            image.save(directory / shape / f"{index:05d}.jpg", quality=95)
    return directory
