"""The MLX side of elm: the OpenELM twin, loading, generation, LoRA fine-tuning, CatLIP inference."""

from elm_mlx.loading import load, load_model
from elm_mlx.model import Model

__all__ = ["Model", "load", "load_model"]
