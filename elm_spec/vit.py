"""The ViT shape both twins build CatLIP models from, and the CatLIP model directory contract.

A CatLIP model directory holds `config.json` (model_type "catlip_vit": the ViT shape, the
image size, mean/std, the synset vocabulary with names), `model.safetensors`, and the
vocabulary files `vocab.json` / `vocab.pkl` written by `elm catlip vocab`. `"framework"` in
config.json says whose tensor layout the weights use ("torch" or "mlx").

The ViT follows CoreNet's: a three-convolution stem (the first two with BatchNorm and GELU)
whose strides multiply to the patch size, a learnable position embedding added to the patch
tokens only (bilinearly resized for other input sizes), a class token, pre-norm blocks
(LayerNorm eps 1e-6, qkv with bias, GELU MLP), a final LayerNorm and a linear classifier on
the class token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec.errors import ElmError

MODEL_TYPE = "catlip_vit"
VOCAB_JSON = "vocab.json"
VOCAB_PICKLE = "vocab.pkl"


def transformer_block_macs(tokens: int, width: int, ffn_dim: int) -> int:
    """Multiply-adds of one pre-norm block over TOKENS: QKV and output projections, the MLP,
    and attention's two T x T products counted in full."""
    return tokens * (4 * width * width + 2 * width * ffn_dim) + 2 * tokens * tokens * width


@dataclass(frozen=True)
class ViTSpec:
    """Shape of a CoreNet-style ViT with a linear head of `num_classes` outputs."""

    embed_dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 1000
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ElmError(message)

        for key in ("embed_dim", "num_layers", "num_heads", "ffn_dim", "image_size", "num_classes"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                 f"{key} must be a positive integer, got {getattr(self, key)!r}")
        need(self.embed_dim % self.num_heads == 0,
             f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        need(self.patch_size in (4, 8, 16, 32),
             f"patch_size must be 4, 8, 16 or 32 (the conv stem strides), got {self.patch_size}")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def stem_dim(self) -> int:
        return max(32, self.embed_dim // 4)

    @property
    def stem_strides(self) -> tuple[int, int, int]:
        """CoreNet's (4, 2, 2) for patch 16; the first stride scales for other patch sizes."""
        return (self.patch_size // 4, 2, 2)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def num_parameters(self) -> int:
        d, s, f = self.embed_dim, self.stem_dim, self.ffn_dim
        k0 = self.stem_strides[0]
        stem = 3 * s * k0 * k0 + 2 * s + s * s * 4 + 2 * s + s * d * 4 + d
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return (stem + self.grid_size ** 2 * d + d + self.num_layers * block + 2 * d
                + d * self.num_classes + self.num_classes)

    def flops_per_image(self, image_size: int | None = None, classifier: bool = True) -> float:
        """Training FLOPs per image (forward + backward = 3x forward; matmuls and convs only),
        with or without the classification head."""
        size = image_size or self.image_size
        tokens = (size // self.patch_size) ** 2 + 1
        d, s, f = self.embed_dim, self.stem_dim, self.ffn_dim
        k0 = self.stem_strides[0]
        stem = ((size // k0) ** 2 * 3 * s * k0 * k0 + (size // (2 * k0)) ** 2 * s * s * 4
                + (size // self.patch_size) ** 2 * s * d * 4)
        block = transformer_block_macs(tokens, d, f)
        head = d * self.num_classes if classifier else 0
        forward = 2 * (stem + self.num_layers * block + head)
        return 3.0 * forward

    def replace(self, **changes: Any) -> ViTSpec:
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ViTSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in config]
        if missing:
            raise ElmError(f"ViT config is missing key {missing[0]!r}")
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> ViTSpec:
        if name not in VIT_PRESETS:
            raise ElmError(f"unknown ViT preset {name!r}; choose from {', '.join(VIT_PRESETS)}")
        return VIT_PRESETS[name].replace(**changes) if changes else VIT_PRESETS[name]


# CoreNet's modes (corenet/modeling/models/classification/config/vit.py); "vit-test" is
# CoreNet's one-layer test shape, used at small image sizes in our tests.
VIT_PRESETS: dict[str, ViTSpec] = {
    "vit-test": ViTSpec(embed_dim=128, num_layers=1, num_heads=2, ffn_dim=128),
    "vit-tiny": ViTSpec(embed_dim=192, num_layers=12, num_heads=3, ffn_dim=768),
    "vit-small": ViTSpec(embed_dim=384, num_layers=12, num_heads=6, ffn_dim=1536),
    "vit-base": ViTSpec(embed_dim=768, num_layers=12, num_heads=12, ffn_dim=3072),
    "vit-large": ViTSpec(embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "vit-huge": ViTSpec(embed_dim=1280, num_layers=32, num_heads=20, ffn_dim=5120),
}


@dataclass(frozen=True)
class CatLIPConfig:
    """config.json of a CatLIP model directory."""

    vit: ViTSpec
    synsets: tuple[str, ...]
    names: tuple[str, ...]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_fraction: float = 0.875
    framework: str = "torch"

    def __post_init__(self) -> None:
        if len(self.synsets) != self.vit.num_classes or len(self.names) != self.vit.num_classes:
            raise ElmError(f"vocabulary has {len(self.synsets)} synsets and {len(self.names)} "
                           f"names but the classifier has {self.vit.num_classes} outputs")
        if self.framework not in ("torch", "mlx"):
            raise ElmError(f"framework must be 'torch' or 'mlx', got {self.framework!r}")

    def to_json(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "framework": self.framework, **self.vit.to_config(),
                "mean": list(self.mean), "std": list(self.std),
                "crop_fraction": self.crop_fraction,
                "vocabulary": [{"id": s, "name": n} for s, n in zip(self.synsets, self.names,
                                                                     strict=True)]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "config.json") -> CatLIPConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ElmError(f"{where}: model_type is {data.get('model_type')!r}, "
                           f"expected {MODEL_TYPE!r}")
        try:
            vit = ViTSpec.from_config(data)
            vocabulary = data["vocabulary"]
            return cls(vit=vit, synsets=tuple(str(v["id"]) for v in vocabulary),
                       names=tuple(str(v["name"]) for v in vocabulary),
                       mean=tuple(float(v) for v in data.get("mean", (0, 0, 0))),
                       std=tuple(float(v) for v in data.get("std", (1, 1, 1))),
                       crop_fraction=float(data.get("crop_fraction", 0.875)),
                       framework=str(data.get("framework", "torch")))
        except ElmError as error:
            raise ElmError(f"{where}: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise ElmError(f"{where}: malformed CatLIP config ({error!r})") from None


def is_catlip_dir(path: str | Path) -> bool:
    """True when PATH is a directory whose config.json names model_type catlip_vit."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_catlip_config(path: str | Path) -> CatLIPConfig:
    from elm_spec.modeldir import read_config

    return CatLIPConfig.from_json(read_config(path), where=str(Path(path) / "config.json"))


def load_rgb(path: str | Path):
    """A Pillow RGB image, or ElmError naming the file when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ElmError(f"{path}: not a readable image ({error})") from None


def eval_transform(image, size: int, crop_fraction: float,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Resize the shorter side to size / crop_fraction, centre-crop size x size, scale to [0, 1]
    and normalise: float32 [3, size, size]. Both twins and training evaluation use this."""
    from PIL import Image

    short = round(size / crop_fraction)
    width, height = image.size
    scale = short / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.Resampling.BILINEAR)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return normalize(np.asarray(cropped, dtype=np.float32) / 255.0, mean, std)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> normalised [3, H, W] float32."""
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean_array) / std_array).transpose(2, 0, 1))


def to_mlx_layout(name: str, array: np.ndarray) -> np.ndarray:
    """One tensor of a torch-layout CatLIP ViT in MLX's layout: convolution weights go from
    [out, in, kh, kw] to [out, kh, kw, in]; everything else is unchanged."""
    if name.startswith("stem.conv") and name.endswith(".weight") and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    return array
