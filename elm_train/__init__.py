"""The PyTorch side of elm: the OpenELM twin, data, training, distributed, benchmarks, CatLIP, eval."""

from elm_train.model import OpenELM
from elm_train.modeldir import load_model, save_model_dir

__all__ = ["OpenELM", "load_model", "save_model_dir"]
