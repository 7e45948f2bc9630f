"""Format bridges: model dir <-> MLX dir, CoreNet `.pt`, HF repos, training checkpoints.

torch and MLX are imported only where a format needs them.
"""

from convert.pipeline import ConvertOptions, ConvertReport, convert
from convert.sources import ShapeOptions

__all__ = ["ConvertOptions", "ConvertReport", "ShapeOptions", "convert"]
