"""Evaluation shared by both twins: perplexity, zero-shot tasks in lm-eval's formats, reports.

Nothing here imports torch or MLX at module level; `elm_eval.backend.load_eval_model` picks
the twin (`elm_train.eval` or `elm_mlx.eval`) that scores the tokens.
"""

from elm_eval.backend import EvalModel, default_backend, load_eval_model

__all__ = ["EvalModel", "default_backend", "load_eval_model"]
