"""Evaluation shared by both twins: perplexity, zero-shot tasks in lm-eval's formats, reports.

Nothing here imports torch or MLX at module level; `elm_eval.backend.load_eval_model` picks
the twin (`elm_eval.torch_model` or `elm_eval.mlx_model`) that scores the tokens.
"""

from elm_eval.backend import default_backend, load_eval_model
from elm_eval.model import EvalModel

__all__ = ["EvalModel", "default_backend", "load_eval_model"]
